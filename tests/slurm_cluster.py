"""The tests' own SLURM cluster: tests/slurm/local_cluster.sh driven from Python, every wait bounded.

`LocalSlurm.start()` installs (apt-get) and starts slurmctld, two slurmd (emulated nodes n1, n2),
slurmdbd and MariaDB on loopback; `stop()` stops them only if this session started them (a
cluster that was already up is left running).
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

SCRIPT = Path(__file__).parent / "slurm" / "local_cluster.sh"
RUN_DIR = Path(os.environ.get("HYDRALM_SLURM_RUN", "/run/hydralm-slurm"))


def _daemon_alive(pid_file: Path, comm: str) -> bool:
    try:
        pid = int(pid_file.read_text().strip())
        return Path(f"/proc/{pid}/comm").read_text().strip() == comm
    except (OSError, ValueError):
        return False


class LocalSlurm:
    def __init__(self):
        self.started_here = False

    @staticmethod
    def available() -> str | None:
        """Why this machine cannot run the cluster, or None."""
        if os.geteuid() != 0:
            return "starting a SLURM cluster needs root"
        if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
            return "needs apt-get (Debian) to install SLURM"
        return None

    def start(self, timeout: float = 900) -> None:
        already_up = _daemon_alive(RUN_DIR / "slurmctld.pid", "slurmctld")
        result = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"local SLURM did not start:\n{result.stdout}\n{result.stderr}")
        self.started_here = not already_up

    def stop(self) -> None:
        if self.started_here:
            subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=180)

    @staticmethod
    def job_field(job_id: str, field: str) -> str:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                             timeout=30).stdout
        return next((item.split("=", 1)[1] for item in out.split() if item.startswith(field + "=")), "")

    @staticmethod
    def wait_for(condition, timeout: float, what: str, interval: float = 0.25):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
