"""HTTP routes: create an embedding, start a training job, follow its progress, interrupt it.

    POST /ti-trainer/v1/create              {"name", "init_text", "num_vectors", "overwrite"} -> {"path", "info"}
    POST /ti-trainer/v1/train               TrainConfig fields (JSON)                          -> {"id", "status"}
    GET  /ti-trainer/v1/progress/{id}       -> the job's progress
    POST /ti-trainer/v1/interrupt/{id}      -> the job's progress; it stops and saves at the next step

With credentials (the WebUI's --api-auth "user:pass,user2:pass2") every route needs the same HTTP basic auth
as the WebUI's own API. The embeddings and templates folders are the host's; a request cannot move them.
"""

import dataclasses
import secrets

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel

from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.create import create_embedding
from ti_trainer.errors import UserError
from ti_trainer.host.base import HostServices
from ti_trainer.host.jobs import JobRegistry

PREFIX = "/ti-trainer/v1"


class CreateRequest(BaseModel):
    name: str
    init_text: str = "*"
    num_vectors: int = 1
    overwrite: bool = False


def parse_credentials(api_auth: str | None) -> dict[str, str]:
    """The WebUI's --api-auth value, "user:pass,user2:pass2", as {user: password}."""
    pairs = [item.strip().split(":", 1) for item in (api_auth or "").split(",") if ":" in item]
    return {user: password for user, password in pairs}


def require_credentials(credentials: dict[str, str]):
    """A FastAPI dependency: HTTP basic auth against `credentials`; none required when it is empty."""

    # FastAPI reads its dependencies from parameter defaults (0.94 predates Annotated), hence the noqa.
    def check(given: HTTPBasicCredentials | None = Depends(HTTPBasic(auto_error=False))) -> None:  # noqa: B008
        if not credentials:
            return
        if given is not None:
            # Compare every pair in full, so the time taken says nothing about which part was wrong.
            matches = [
                secrets.compare_digest(given.username.encode(), user.encode())
                & secrets.compare_digest(given.password.encode(), password.encode())
                for user, password in credentials.items()
            ]
            if any(matches):
                return
        raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return check


def add_routes(app: FastAPI, services: HostServices, jobs: JobRegistry, credentials: dict[str, str]) -> None:
    router = APIRouter(prefix=PREFIX, dependencies=[Depends(require_credentials(credentials))])

    @router.post("/create")
    def create(request: CreateRequest) -> dict:
        try:
            path = create_embedding(
                services.get_backend(),
                request.name,
                request.init_text,
                request.num_vectors,
                services.embeddings_dir,
                request.overwrite,
            )
        except UserError as error:
            raise HTTPException(400, str(error)) from error
        services.refresh_embeddings()
        return {"path": str(path), "info": f"Created embedding {path.stem!r}: {path}"}

    @router.post("/train")
    def start_training(body: dict = Body(...)) -> dict:  # noqa: B008
        known = {field.name for field in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise HTTPException(
                422, f"Unknown training settings: {', '.join(unknown)}. Known: {', '.join(sorted(known))}."
            )
        settings = {**services.defaults, "log_dir": str(services.log_dir), **body}
        settings.update(
            embeddings_dir=str(services.embeddings_dir),
            templates_dirs=[str(folder) for folder in services.templates_dirs],
        )
        try:
            job_id = jobs.start(TrainConfig.from_dict(settings))
        except (UserError, TypeError, ValueError) as error:
            raise HTTPException(400, str(error)) from error
        return {"id": job_id, "status": "queued"}

    @router.get("/progress/{job_id}")
    def progress(job_id: str) -> dict:
        return dataclasses.asdict(_known(jobs.progress, job_id))

    @router.post("/interrupt/{job_id}")
    def interrupt(job_id: str) -> dict:
        return dataclasses.asdict(_known(jobs.interrupt, job_id))

    app.include_router(router)


def _known(action, job_id: str):
    try:
        return action(job_id)
    except KeyError as error:
        raise HTTPException(404, f"No training job with id {job_id!r}.") from error
