#!/usr/bin/env python3
# /// script
# requires-python = ">=3.11"
# dependencies = ["httpx>=0.27"]
# ///
"""Cancel GitHub Actions runs whose GPU job has waited in the queue for too long.

A job's ``timeout-minutes`` starts counting when a runner picks the job up, so a job for a
self-hosted GPU runner that is offline (or an on-demand instance that never came up) waits
queued until GitHub drops it a day later, holding its concurrency group all that time. The
``gpu-watchdog`` workflow runs this on a schedule:

    GITHUB_TOKEN=... uv run scripts/cancel_stale_gpu_runs.py --repo OWNER/NAME \\
        --workflow gpu.yml --label gpu --max-queued-minutes 30 [--dry-run]

It lists the queued and in-progress runs (of one workflow, or all), and cancels each run that
has a job still queued for a runner with the label, created more than the allowed minutes ago.
The token needs ``actions: write``. Exit status 0 unless the API fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

API_VERSION = "2022-11-28"
# Run states in which a job can still be waiting for a runner.
OPEN_RUN_STATUSES = ("queued", "in_progress")


@dataclass(frozen=True)
class StaleJob:
    """A job queued for a labelled runner for longer than allowed, and the run it belongs to."""

    run_id: int
    run_url: str
    job_name: str
    queued_for: timedelta


def paginate(client: httpx.Client, url: str, key: str, **params: Any) -> Iterator[dict]:
    """Every item under ``key`` across the pages of a GitHub list endpoint."""
    response = client.get(url, params={"per_page": 100, **params})
    while True:
        response.raise_for_status()
        yield from response.json()[key]
        next_url = response.links.get("next", {}).get("url")
        if next_url is None:
            return
        response = client.get(next_url)


def open_runs(client: httpx.Client, repo: str, workflow: str | None) -> Iterator[dict]:
    """Queued and in-progress runs of ``workflow`` (a file name or id), or of every workflow."""
    scope = f"/workflows/{workflow}" if workflow else ""
    url = f"/repos/{repo}/actions{scope}/runs"
    for status in OPEN_RUN_STATUSES:
        yield from paginate(client, url, "workflow_runs", status=status)


def parse_time(stamp: str) -> datetime:
    """A GitHub timestamp (``2026-11-23T17:51:51Z``) as an aware datetime."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def stale_jobs(
    client: httpx.Client,
    repo: str,
    workflow: str | None,
    label: str,
    max_queued: timedelta,
    now: datetime,
) -> Iterator[StaleJob]:
    """Jobs queued for a runner labelled ``label`` for longer than ``max_queued``."""
    for run in open_runs(client, repo, workflow):
        jobs_url = f"/repos/{repo}/actions/runs/{run['id']}/jobs"
        for job in paginate(client, jobs_url, "jobs", filter="latest"):
            if job["status"] != "queued" or label not in job.get("labels", []):
                continue
            queued_for = now - parse_time(job.get("created_at") or job["started_at"])
            if queued_for > max_queued:
                yield StaleJob(run["id"], run["html_url"], job["name"], queued_for)


def cancel_run(client: httpx.Client, repo: str, run_id: int) -> bool:
    """Ask GitHub to cancel a run; False when it has finished meanwhile (409)."""
    response = client.post(f"/repos/{repo}/actions/runs/{run_id}/cancel")
    if response.status_code == httpx.codes.CONFLICT:
        return False
    response.raise_for_status()
    return True


def cancel_stale_runs(
    client: httpx.Client,
    repo: str,
    workflow: str | None,
    label: str,
    max_queued: timedelta,
    now: datetime,
    dry_run: bool = False,
) -> list[int]:
    """Cancel every run with a stale queued job (each run once); the ids of those cancelled."""
    cancelled: list[int] = []
    for stale in stale_jobs(client, repo, workflow, label, max_queued, now):
        if stale.run_id in cancelled:
            continue
        minutes, limit = stale.queued_for / timedelta(minutes=1), max_queued / timedelta(minutes=1)
        action = "would cancel" if dry_run else "cancelling"
        print(
            f"{action} run {stale.run_id} ({stale.run_url}): job {stale.job_name!r} "
            f"queued for {minutes:.0f} min (limit {limit:.0f})"
        )
        if dry_run or cancel_run(client, repo, stale.run_id):
            cancelled.append(stale.run_id)
    return cancelled


def github_client(token: str, api_url: str) -> httpx.Client:
    """An httpx client for the REST API, authenticated with ``token``."""
    headers = {
        "Accept": "application/vnd.github+json",
        "Authorization": f"Bearer {token}",
        "X-GitHub-Api-Version": API_VERSION,
    }
    return httpx.Client(base_url=api_url, headers=headers, timeout=30.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    env = os.environ
    add = parser.add_argument
    add("--repo", default=env.get("GITHUB_REPOSITORY"), help="OWNER/NAME [$GITHUB_REPOSITORY]")
    add("--workflow", help="workflow file name or id, e.g. gpu.yml (default: every workflow)")
    add("--label", default="gpu", help="runner label of the GPU jobs (default: gpu)")
    add("--max-queued-minutes", type=float, default=30.0, help="allowed queue time (default: 30)")
    add("--dry-run", action="store_true", help="print what would be cancelled, cancel nothing")
    add("--api-url", default=env.get("GITHUB_API_URL", "https://api.github.com"))
    args = parser.parse_args(argv)
    if not args.repo:
        parser.error("--repo is required (or set GITHUB_REPOSITORY)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token = os.environ.get("GITHUB_TOKEN") or os.environ.get("GH_TOKEN")
    if not token:
        print("error: set GITHUB_TOKEN (or GH_TOKEN), a token with actions: write", file=sys.stderr)
        return 2
    max_queued, now = timedelta(minutes=args.max_queued_minutes), datetime.now(UTC)
    with github_client(token, args.api_url) as client:
        cancelled = cancel_stale_runs(
            client, args.repo, args.workflow, args.label, max_queued, now, args.dry_run
        )
    print(f"{len(cancelled)} run(s) {'to cancel' if args.dry_run else 'cancelled'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
