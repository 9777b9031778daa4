"""What the dashboard, ``/health`` and the API show, as plain data (no HTML here)."""

from __future__ import annotations

import datetime
from typing import Mapping, Optional, Sequence

from sftpauth import __version__
from sftpauth.config.models import Configuration, LDAPAuthenticationSettings, host_port
from sftpauth.state import SharedState

RUNNING = "running"


def service_overview(configuration: Configuration, states: Mapping[str, str]) -> list[dict]:
    result = []
    for service_id, service in configuration.services.items():
        if not service.enabled:
            state = "disabled"
        else:
            state = states.get(service_id, "unknown")
        result.append(
            {
                "id": service_id,
                "name": service.title,
                "type": service.type,
                "address": service.address,
                "port": service.port,
                "endpoint": host_port(service.address, service.port),
                "state": state,
                "authentications": list(configuration.authentications_for(service))
                if service.type != "ldap-directory"
                else [],
            }
        )
    return result


def _when(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    try:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return ""
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def ldap_overview(configuration: Configuration, pools: Mapping, now: float) -> list[dict]:
    """Each LDAP method with each server's state: up, down (and why) or not contacted yet."""
    result = []
    for method_id, settings in configuration.authentications.items():
        if not isinstance(settings, LDAPAuthenticationSettings):
            continue
        pool = pools.get(method_id)
        servers = []
        if pool is not None:
            for state in pool.states():
                item = state.as_dict()
                item["description"] = state.describe(now)
                item["since_text"] = _when(state.since)
                servers.append(item)
        result.append(
            {
                "id": method_id,
                "name": settings.name or method_id,
                "enabled": settings.enabled,
                "security": {"no": "plain LDAP", "yes": "LDAPS", "starttls": "StartTLS"}[settings.secure_connection],
                "bind_dn_type": settings.bind_dn_type,
                "timeout": settings.timeout,
                "manager_logins": settings.manager_search_filter is not None,
                "servers": servers,
                "up": sum(1 for server in servers if server["status"] == "up"),
                "down": sum(1 for server in servers if server["status"] == "down"),
            }
        )
    return result


def health_report(
    configuration: Configuration, pools: Mapping, states: Mapping[str, str], shared_state: Optional[SharedState] = None
) -> dict:
    """``ok``; ``degraded`` when an LDAP method has every server down or Redis is; ``failing`` when a service is not running."""
    services = {}
    failing = False
    for service_id, service in configuration.services.items():
        state = states.get(service_id, "unknown") if service.enabled else "disabled"
        services[service_id] = {"type": service.type, "state": state}
        if service.enabled and state not in (RUNNING, "unknown"):
            failing = True
    ldap = {}
    degraded = False
    for method_id, pool in pools.items():
        servers = [
            {"address": str(state.address), "status": state.status, "latency_ms": state.as_dict()["latency_ms"]}
            for state in pool.states()
        ]
        up = sum(1 for server in servers if server["status"] == "up")
        if servers and all(server["status"] == "down" for server in servers):
            degraded = True
        ldap[method_id] = {"servers": servers, "up": up, "total": len(servers)}
    report = {"services": services, "ldap": ldap}
    connection = shared_state.connection if shared_state is not None else None
    if connection is not None:  # Redis down: TOTP logins are refused, bans are per node
        report["shared_state"] = {"url": connection.location.url, "status": connection.status}
        degraded = degraded or connection.status in (connection.DOWN, connection.REFUSING)
    status = "failing" if failing else ("degraded" if degraded else "ok")
    return {"status": status, "version": __version__, **report}


def build_chart(series: Sequence[tuple[int, int, int]], width: int = 1120, height: int = 180) -> dict:
    """Stacked bars (accepted under refused) for an inline SVG: geometry only, no script."""
    left, right, top, bottom = 34, 8, 10, 22
    plot_width = width - left - right
    plot_height = height - top - bottom
    peak = max([accepted + refused for _, accepted, refused in series] + [1])
    scale_top = _nice_ceiling(peak)
    slot = plot_width / max(1, len(series))
    bars = []
    for index, (ago, accepted, refused) in enumerate(series):
        x = left + index * slot + 1
        accepted_height = plot_height * accepted / scale_top
        refused_height = plot_height * refused / scale_top
        base = top + plot_height
        label = "now" if ago == 0 else f"{ago} min ago"
        bars.append(
            {
                "x": round(x, 1),
                "width": round(max(1.0, slot - 2), 1),
                "accepted_y": round(base - accepted_height, 1),
                "accepted_height": round(accepted_height, 1),
                "refused_y": round(base - accepted_height - refused_height, 1),
                "refused_height": round(refused_height, 1),
                "title": f"{label}: {accepted} accepted, {refused} refused",
            }
        )
    grid = [
        {"y": round(top + plot_height - plot_height * value / scale_top, 1), "label": str(value)}
        for value in sorted({0, scale_top // 2, scale_top})
    ]
    ticks = [
        {"x": round(left + (len(series) - minutes) * slot, 1), "label": "now" if minutes == 0 else f"-{minutes} min"}
        for minutes in (60, 45, 30, 15, 0)
        if minutes <= len(series)
    ]
    return {
        "width": width,
        "height": height,
        "left": left,
        "top": top,
        "right": width - right,
        "bottom": top + plot_height,
        "bars": bars,
        "grid": grid,
        "ticks": ticks,
    }


def _nice_ceiling(value: int) -> int:
    for step in (1, 2, 4, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000):
        if value <= step:
            return step
    magnitude = 10 ** (len(str(value)) - 1)
    return ((value + magnitude - 1) // magnitude) * magnitude
