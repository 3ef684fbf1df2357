"""HTTP routes: create an embedding, start a training job, follow its progress, interrupt it.

    POST /ti-trainer/v1/create              {"name", "init_text", "num_vectors", "overwrite"} -> {"path", "info"}
    POST /ti-trainer/v1/train               TrainConfig fields (JSON)                          -> {"id", "status"}
    GET  /ti-trainer/v1/progress/{id}       -> the job's progress
    POST /ti-trainer/v1/interrupt/{id}      -> the job's progress; it stops and saves at the next step

The host adds these routes only where it serves its own API (the WebUI: with --api, or --nowebui). With
credentials (the WebUI's --api-auth "user:pass,user2:pass2") every route needs the same HTTP basic auth as the
WebUI's own API. The log, embeddings and templates folders are the host's: a request may name a folder inside
them, and anything outside is refused with 400, so a caller cannot make the host read or write elsewhere.
"""

import dataclasses
import os
import secrets
from pathlib import Path

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel

from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.create import create_embedding
from ti_trainer.errors import UserError
from ti_trainer.host.base import HostServices
from ti_trainer.host.jobs import JobRegistry
from ti_trainer.text.templates import BUILTIN_TEMPLATES_DIR, list_templates

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
        try:
            settings = {**services.defaults, **body, **confined_folders(body, services)}
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


def confined_folders(body: dict, services: HostServices) -> dict:
    """The request's log folder, embeddings folder and template, each kept inside the host's folders.

    A relative path is taken inside the host's folder; an absolute one must lie inside it. The templates
    folders are always the host's. UserError (answered with 400) names the setting and the allowed folder.
    """
    template_roots = [*map(Path, services.templates_dirs), BUILTIN_TEMPLATES_DIR]
    given = body.get("templates_dirs") or []
    for folder in [given] if isinstance(given, str) else given:
        if not any(_inside(root, str(folder)) for root in template_roots):
            raise UserError(_outside_message("templates_dirs", folder, template_roots))
    folders = {
        "log_dir": str(_confined("log_dir", body.get("log_dir"), Path(services.log_dir))),
        "embeddings_dir": str(
            _confined("embeddings_dir", body.get("embeddings_dir"), services.embeddings_dir)
        ),
        "templates_dirs": [str(folder) for folder in services.templates_dirs],
    }
    if "template" in body:
        folders["template"] = _confined_template(str(body["template"]), template_roots)
    return folders


def _confined(setting: str, value, root: Path) -> Path:
    if value in (None, ""):
        return Path(root)
    path = _inside(Path(root), str(value))
    if path is None:
        raise UserError(_outside_message(setting, value, [root]))
    return path


def _confined_template(template: str, roots: list[Path]) -> str:
    """A template name listed in the host's folders (kept as the name), or a path to a file inside them."""
    if not (os.sep in template or "/" in template or Path(template).is_absolute()):
        available = list_templates(*roots)
        if template not in available:
            raise UserError(
                f"Prompt template {template!r} not found. Available: {', '.join(available) or 'none'}."
            )
        return template
    for root in roots:
        path = _inside(root, template)
        if path is not None and path.is_file():
            return str(path)
    raise UserError(_outside_message("template", template, roots, "a .txt file inside"))


def _inside(root: Path, value: str) -> Path | None:
    """`value` (relative: taken inside `root`) resolved, if it lies in `root` or is `root`; else None."""
    root = Path(root).expanduser().resolve()
    path = (root / Path(value).expanduser()).resolve()  # an absolute value replaces root here
    return path if os.path.commonpath([root, path]) == str(root) else None


def _outside_message(setting: str, value, roots: list[Path], what: str = "a folder inside") -> str:
    allowed = " or ".join(str(Path(root).resolve()) for root in roots)
    return (
        f"{setting} {str(value)!r} is outside the host's folders. Through the API it must be {what} {allowed} "
        f"(a relative path is taken inside it); leave {setting} out to use the host's own."
    )


def _known(action, job_id: str):
    try:
        return action(job_id)
    except KeyError as error:
        raise HTTPException(404, f"No training job with id {job_id!r}.") from error
