"""What hydralm tells the user of a job: printed once and kept in the job log (`hydralm.log`,
Hydra's file handler), with secrets masked. Ground level (logging and launcher/secrets.py only),
so every layer can say what it did; cli/console.py handles errors and the console itself.
"""

import logging

from launcher.secrets import mask_secrets

log = logging.getLogger("hydralm")


def announce(text: str) -> None:
    """Print a result for the user and keep it in the job log (the console already shows it once)."""
    print(text, flush=True)
    record_in_job_log(logging.INFO, text.strip("\n"))


def record_in_job_log(level: int, text: str) -> None:
    """Write to the job's log files only (Hydra's `hydralm.log` handler), not to the console."""
    record = logging.LogRecord(log.name, level, __file__, 0, mask_secrets(text), None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
