"""When a booted guest has finished starting: its template must be saved only then. A Debian
cloud guest opens port 22 well before cloud-init's last stages and systemd's other boot jobs
end; saved at that moment, every machine restored from it ran them again, which under TCG
took its one vCPU for a minute. Without systemd (the demo guest) there is nothing to wait for.
"""

SCRIPT = """\
command -v systemctl >/dev/null 2>&1 || exit 0
systemctl is-system-running --wait >/dev/null 2>&1 || true
"""
"""Run by the guest agent; ``is-system-running`` exits non-zero for ``degraded`` (a unit
failed), which is a finished start too."""
