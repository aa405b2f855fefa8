"""Stages that run a trained model over data instead of training one: config.job names them.

A job is a module with `JOB` (its name, config.job's value), `CONFIG_KEYS` (every
key of its config, declared), `default_config()`, `check_config(config, path)`
(its checks across keys), `results(workdir)` (what the results table shows of
it, or None) and `run(config, workdir, *, devices)`, which the chain calls. The one
job so far labels unlabelled images for self-training (pseudo_label_job.py).
"""

from __future__ import annotations

from big_pretrain.registry import Registry
from big_pretrain.stages import pseudo_label_job

# config.job -> the job's module.
JOBS = Registry('job', [pseudo_label_job], name_of=lambda job: job.JOB)


def is_job(stage_config) -> bool:
  """Whether a stage's config is a job's (it has config.job) rather than a training stage's."""
  return 'job' in stage_config


def job_names() -> list[str]:
  return JOBS.names()


def job_module(name: str):
  return JOBS[name]
