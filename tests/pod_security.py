"""The `restricted` Pod Security Standard, re-implemented for tests: no pod-security admission controller runs here
(tests/k8s_emulator.py is an API-server emulator), so the checks of
https://kubernetes.io/docs/concepts/security/pod-security-standards/ are applied to every pod template metascale
renders (RayJob head/workers/submitter, the Helm chart, deploy/)."""

from __future__ import annotations

from typing import Any

RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What the `restricted` Pod Security Standard (https://kubernetes.io/docs/concepts/security/pod-security-standards/,
    policy version latest, which includes `baseline`) forbids in one pod spec. A re-implementation of the pod-security
    admission controller's checks from that page, since no admission controller runs here."""
    problems: list[str] = []
    psc = pod.get("securityContext") or {}
    containers = [
        (kind, c) for kind in ("initContainers", "containers", "ephemeralContainers") for c in pod.get(kind) or []
    ]
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"{field} must be unset or false")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        problems.append("securityContext.windowsOptions.hostProcess must be unset or false")
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {v.get('name')}: type {', '.join(sorted(kinds - RESTRICTED_VOLUMES))} not allowed")
    for name in {s.get("name") for s in psc.get("sysctls") or []} - SAFE_SYSCTLS:
        problems.append(f"sysctl {name} is not in the safe set")
    problems += [f"pod {p}" for p in _context_problems(psc)]
    if psc.get("runAsUser") == 0:
        problems.append("pod securityContext.runAsUser must not be 0")
    for kind, c in containers:
        sc, where = c.get("securityContext") or {}, f"{kind} {c.get('name')}"
        if sc.get("privileged"):
            problems.append(f"{where}: privileged must be unset or false")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"{where}: windowsOptions.hostProcess must be unset or false")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            problems.append(f"{where}: hostPort must be unset or 0")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{where}: procMount must be Default")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{where}: capabilities.drop must include ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: capabilities.add may hold only NET_BIND_SERVICE")
        problems += [f"{where}: {p}" for p in _context_problems(sc)]
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            problems.append(f"{where}: runAsNonRoot must be true (in the container or the pod)")
        if sc.get("runAsUser") == 0:
            problems.append(f"{where}: runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(
                f"{where}: seccompProfile.type must be RuntimeDefault or Localhost (in the container or "
                f"the pod), got {seccomp!r}"
            )
    return problems


def _context_problems(sc: dict[str, Any]) -> list[str]:
    problems = []
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
        problems.append("seLinuxOptions: type must be a container type, user and role unset")
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor not in (None, "RuntimeDefault", "Localhost"):
        problems.append(f"appArmorProfile.type {apparmor} is not allowed")
    if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
        problems.append("seccompProfile.type must not be Unconfined")
    return problems
