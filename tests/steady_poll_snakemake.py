"""`snakemake`, with the SLURM executor's status poll kept at its first interval: for
tests/test_slurm.py only.

snakemake-executor-plugin-slurm waits 10 s longer after each status poll in which no job finished,
up to 180 s (Executor.check_active_jobs), which spares a busy cluster's controller. On the test's
one-node cluster, where each job lasts seconds to a minute, the waits grew past the jobs and
finished jobs sat unnoticed: about half of the test's SLURM run. Here every poll comes
`--slurm-init-seconds-before-status-checks` after the last. Nothing else changes: the same
command line, profile, sbatch submissions, job steps and logs as `snakemake`.
"""

import sys

from snakemake.cli import main
from snakemake_executor_plugin_slurm import Executor

plugin_check = Executor.check_active_jobs


async def check_active_jobs(self, active_jobs):
    async for job in plugin_check(self, active_jobs):
        yield job
    self.next_seconds_between_status_checks = self.workflow.executor_settings.init_seconds_before_status_checks


Executor.check_active_jobs = check_active_jobs

if __name__ == "__main__":
    sys.exit(main())
