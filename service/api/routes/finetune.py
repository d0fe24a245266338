"""``/v1/finetune``: upload a dataset, queue a Dual-LoRA fine-tune, follow and cancel the job."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.api.auth import check_adapter
from service.api.deps import SettingsDep
from service.api.rows import sse
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia
from service.registry.store import validate_name
from service.training.dataset import DatasetLimits, parse_dataset
from service.training.hyperparameters import Hyperparameters
from service.training.jobs import TERMINAL, JobStore

router = APIRouter(tags=["fine-tuning"])

HYPERPARAMETER_FIELDS = set(Hyperparameters.model_fields) - {"target_modules"}


def jobs_of(request: Request) -> JobStore:
    return request.app.state.jobs


async def _save_upload(upload: UploadFile, path: Path, limit: int) -> int:
    size = 0
    with path.open("wb") as out:
        while chunk := await upload.read(1024 * 1024):
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"dataset exceeds {limit} bytes")
            out.write(chunk)
    return size


@router.post("/v1/finetune", status_code=202)
async def create_job(request: Request, settings: SettingsDep) -> dict:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UnsupportedMedia("send multipart/form-data with `adapter` and a `dataset` file")
    form = await request.form(max_files=1, max_fields=32)
    upload = form.get("dataset")
    if not isinstance(upload, UploadFile):
        raise InvalidInput("dataset: a file is required (ZIP with data.jsonl, or JSONL with base64 images)")
    name = form.get("adapter")
    if not isinstance(name, str) or not name:
        raise InvalidInput("adapter: a name is required")
    validate_name(name)
    check_adapter(request, name)
    fields = {k: v for k, v in form.items() if k in HYPERPARAMETER_FIELDS and isinstance(v, str)}
    unknown = sorted(k for k in form if k not in HYPERPARAMETER_FIELDS | {"adapter", "dataset"})
    if unknown:
        raise InvalidInput(f"unknown fields: {', '.join(unknown)}")
    try:
        hp = Hyperparameters.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInput(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from exc
    if hp.rank > settings.max_rank:
        raise InvalidInput(f"rank must be at most {settings.max_rank} (the server's slot rank)")

    uploads = settings.data_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    raw = uploads / f"{uuid.uuid4().hex}.upload"
    dataset_dir = settings.data_dir / "datasets" / uuid.uuid4().hex
    try:
        await _save_upload(upload, raw, settings.max_upload_bytes)
        limits = DatasetLimits(max_upload_bytes=settings.max_upload_bytes, max_examples=settings.max_examples,
                               max_image_bytes=settings.max_image_bytes, max_image_pixels=settings.max_image_pixels)
        parsed = await run_in_threadpool(parse_dataset, raw, upload.filename or "dataset", limits)
        await run_in_threadpool(parsed.to_directory, dataset_dir)
    except Exception:
        shutil.rmtree(dataset_dir, ignore_errors=True)
        raise
    finally:
        raw.unlink(missing_ok=True)
    job = jobs_of(request).create(name, hp.model_dump(mode="json"), str(dataset_dir), len(parsed.examples))
    request.app.state.finetune_task(job["id"])
    return job


@router.get("/v1/finetune")
def list_jobs(request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = None) -> dict:
    data, has_more = jobs_of(request).list(limit, after)
    return {"object": "list", "data": data, "has_more": has_more}


@router.get("/v1/finetune/{job_id}")
def get_job(request: Request, job_id: str) -> dict:
    return jobs_of(request).get(job_id)


@router.post("/v1/finetune/{job_id}/cancel")
def cancel_job(request: Request, job_id: str) -> dict:
    return jobs_of(request).cancel(job_id)


@router.get("/v1/finetune/{job_id}/events")
async def job_events(
    request: Request,
    job_id: str,
    after: int = Query(0, ge=0),
    limit: int = Query(200, ge=1, le=1000),
    stream: bool = Query(False, description="server-sent events until the job ends"),
) -> Any:
    jobs = jobs_of(request)
    wants_sse = stream or "text/event-stream" in request.headers.get("accept", "")
    if not wants_sse:
        data = jobs.events(job_id, after, limit)
        return {"object": "list", "data": data, "has_more": len(data) == limit}
    jobs.get(job_id)  # 404 before the stream starts

    async def events():
        last = after
        while True:
            batch = await run_in_threadpool(jobs.events, job_id, last, limit)
            for event in batch:
                last = event["id"]
                yield sse(event)
            job = await run_in_threadpool(jobs.get, job_id)
            if job["status"] in TERMINAL and not batch:
                yield sse(job, event="done")
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.5)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

