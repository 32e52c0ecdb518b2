"""A read-only HTTP API over the ledger (`medfed ledger serve`): the compliance queries, proofs,
FHIR export and the report page, each behind a bearer token whose role (`ledger.access`)
decides what it may read.

Every response is a `ledger.queries` result (the rows `medfed ledger ... --json` prints),
scoped to the caller's role. A request outside its role gets 403 and is itself recorded: an
`access_denied` entry signed by the party running the API (the coordinator or the DPO), with
the token's label, its role, the endpoint and the reason, never the token or a parameter's
value. A request without a valid token gets 401 and is not recorded (anyone could fill the
ledger with those; the process log names the endpoint).

Nothing here writes anything else: the API opens the ledger read-only for every query.

No `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which
name dependencies made inside `create_app`.
"""

import json
import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ledger import LedgerError, fhir, queries, report
from ledger import keys as _keys
from ledger.access import Grant, Section, authenticate
from ledger.entry import Action, Event, Outcome
from ledger.store import open_ledger

log = logging.getLogger("medfed.ledger.api")
COOKIE = "medfed_token"
JOB = "ledger-api"
_REPORTS_KEPT = 16  # rendered report pages kept, by (role, ledger size)
_bearer = HTTPBearer(auto_error=False, description="A token from `medfed ledger token add`.")
Rows = list[dict[str, Any]]
_DENIED = {
    401: {"description": "No token, or a token the server does not know."},
    403: {"description": "Outside the token's role; recorded in the ledger."},
    400: {"description": "A parameter the ledger cannot use (one sentence)."},
}


Site = Annotated[
    str | None,
    Query(
        description="A site name; a site token sees only its own.",
        examples=["st-mary", "lakeside"],
    ),
]
Job = Annotated[str | None, Query(description="A job name.")]
Since = Annotated[str | None, Query(description="ISO 8601 date or time, inclusive.")]
Until = Annotated[str | None, Query(description="ISO 8601 date or time, exclusive.")]


@dataclass
class ApiSettings:
    url: str
    grants: Mapping[str, Grant]
    recorder: _keys.Identity  # signs access_denied entries
    identities: Path | None = None
    # The log key: when given, a checkpoint is signed after each denial, so the ledger keeps
    # verifying against the pinned log key (sites cosign it at the next round they join).
    log_key: _keys.Identity | None = None
    _report_cache: dict[tuple[str, int], str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)


def create_app(settings: ApiSettings) -> FastAPI:
    app = FastAPI(
        title="medfed ledger API",
        version="1",
        description="Read-only compliance queries over the medfed audit ledger. Roles: "
        "auditor (everything), site:<name> (that site's rows), operator (rounds and models).",
    )

    @app.exception_handler(LedgerError)
    def _bad_input(_request: Request, exc: LedgerError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    def caller(
        request: Request,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Grant:
        token = creds.credentials if creds else request.cookies.get(COOKIE)
        grant = authenticate(settings.grants, token)
        if grant is None:
            log.info("401 %s %s", request.method, _endpoint(request))
            raise HTTPException(
                401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )
        return grant

    def deny(request: Request, grant: Grant, reason: str) -> HTTPException:
        """Record the refusal in the ledger, then refuse."""
        details = {
            "role": grant.role,
            "token": grant.label,
            "method": request.method,
            "endpoint": _endpoint(request),
            "parameters": sorted(request.query_params.keys()),
            "reason": reason,
        }
        event = Event(
            actor=settings.recorder.name,
            action=Action.ACCESS_DENIED,
            job=JOB,
            idempotency_key=f"access-denied/{uuid.uuid4().hex}",
            site=grant.site,
            outcome=Outcome.REFUSED,
            purpose="HCOMPL",
            legal_basis="GDPR Art. 32",
            details=details,
        )
        ledger = open_ledger(settings.url, write=True)
        ledger.append(event, settings.recorder)
        if settings.log_key is not None:
            stored = ledger.log_identity()
            origin = stored[0] if stored else f"medfed.local/{settings.log_key.name}"
            ledger.checkpoint(settings.log_key, origin)
        return HTTPException(403, f"role {grant.role} may not {reason}")

    def allowed(section: Section) -> Callable[..., Grant]:
        def check(request: Request, grant: Annotated[Grant, Depends(caller)]) -> Grant:
            if not grant.may(section):
                raise deny(request, grant, f"read {section}")
            site = request.query_params.get("site")
            if site is not None and grant.site is not None and site != grant.site:
                raise deny(request, grant, "read another site's rows")
            return grant

        return check

    reader = open_ledger(settings.url)  # one read-only engine and pool for every request

    def ledger() -> Any:
        return queries.screen(reader, settings.identities)

    def own_site(grant: Grant, site: str | None) -> str | None:
        return grant.site or site

    @app.get("/api/integrity", responses=_DENIED, tags=["integrity"])
    def integrity(_: Annotated[Grant, Depends(allowed(Section.INTEGRITY))]) -> dict[str, Any]:
        """Chain, signatures, Merkle root and checkpoints recomputed now (`ledger verify`)."""
        roster = None
        if settings.identities is not None:
            from ledger.identities import load_roster

            roster = load_roster(settings.identities)
        return queries.integrity(settings.url, roster=roster)

    @app.get("/api/checkpoints", responses=_DENIED, tags=["integrity"])
    def checkpoints(_: Annotated[Grant, Depends(allowed(Section.CHECKPOINTS))]) -> Rows:
        """Every signed checkpoint: size, root, origin, signer, cosigning sites."""
        return queries.checkpoints(reader)

    @app.get("/api/proofs/{entry}", responses=_DENIED, tags=["integrity"])
    def proof(
        entry: str,
        request: Request,
        grant: Annotated[Grant, Depends(allowed(Section.PROOFS))],
    ) -> dict[str, Any]:
        """Inclusion proof of an entry (seq or idempotency key) against the latest checkpoint;
        check it offline with `medfed ledger verify-proof`."""
        from ledger.proof import inclusion

        doc = inclusion(reader, entry)
        if not grant.admits(json.loads(doc["entry"]["body"])):
            raise deny(request, grant, "read an entry outside its role")
        return doc

    @app.get("/api/events", responses=_DENIED, tags=["queries"])
    def events(
        grant: Annotated[Grant, Depends(allowed(Section.EVENTS))],
        site: Site = None,
        actor: str | None = None,
        action: str | None = None,
        job: Job = None,
        round: int | None = None,  # noqa: A002
        purpose: str | None = None,
        entity: Annotated[str | None, Query(description="A hash prefix.")] = None,
        since: Since = None,
        until: Until = None,
    ) -> Rows:
        """Who did what, when, to which entity, for which purpose."""
        rows = queries.events(
            ledger(),
            actor=actor,
            action=action,
            site=own_site(grant, site),
            job=job,
            round=round,
            purpose=purpose,
            entity=entity,
            since=since,
            until=until,
        )
        return grant.scoped(rows)

    @app.get("/api/spend", responses=_DENIED, tags=["privacy"])
    def spend(grant: Annotated[Grant, Depends(allowed(Section.SPEND))], site: Site = None) -> Rows:
        """Per site: epsilon spent (recomputed), budget, remaining, opt-outs, refusals."""
        return queries.spend_summary(ledger(), site=own_site(grant, site))

    @app.get("/api/spend/history", responses=_DENIED, tags=["privacy"])
    def spend_history(
        grant: Annotated[Grant, Depends(allowed(Section.SPEND))], site: Site = None, job: Job = None
    ) -> Rows:
        """Every charge: reservation, population, state, its own epsilon."""
        return queries.spend(ledger(), site=own_site(grant, site), job=job)

    @app.get("/api/spend/timeline", responses=_DENIED, tags=["privacy"])
    def spend_timeline(
        grant: Annotated[Grant, Depends(allowed(Section.SPEND))], site: Site = None
    ) -> Rows:
        """Each charge and refusal with the cumulative epsilon after it."""
        return queries.spend_timeline(ledger(), site=own_site(grant, site))

    @app.get("/api/data-use", responses=_DENIED, tags=["privacy"])
    def data_use(
        grant: Annotated[Grant, Depends(allowed(Section.DATA_USE))], site: Site = None
    ) -> Rows:
        """Datasets by fingerprint, pseudonymous patients, images, jobs, purposes."""
        return queries.data_use(ledger(), site=own_site(grant, site))

    @app.get("/api/disclosures", responses=_DENIED, tags=["privacy"])
    def disclosures(
        grant: Annotated[Grant, Depends(allowed(Section.DISCLOSURES))],
        site: Site = None,
        since: Since = None,
        until: Until = None,
    ) -> Rows:
        """Accounting of disclosures (45 CFR 164.528 style)."""
        return queries.disclosures(ledger(), site=own_site(grant, site), since=since, until=until)

    @app.get("/api/quality", responses=_DENIED, tags=["rounds"])
    def quality(
        grant: Annotated[Grant, Depends(allowed(Section.QUALITY))], job: Job = None
    ) -> Rows:
        """Held-out metrics per round and site as released, and the weighted figures."""
        return grant.scoped(queries.quality(ledger(), job=job))

    @app.get("/api/participation", responses=_DENIED, tags=["rounds"])
    def participation(
        grant: Annotated[Grant, Depends(allowed(Section.PARTICIPATION))], job: Job = None
    ) -> Rows:
        """Per round and site: trained, aggregated, dropped, refused or declined."""
        return grant.scoped(queries.participation(ledger(), job=job))

    @app.get("/api/lineage/{model}", responses=_DENIED, tags=["rounds"])
    def lineage(model: str, _: Annotated[Grant, Depends(allowed(Section.LINEAGE))]) -> Rows:
        """A global model (hash or unique prefix) back to its rounds, updates and datasets."""
        return queries.lineage(ledger(), model)

    @app.get("/api/fhir", responses=_DENIED, tags=["export"])
    def fhir_export(grant: Annotated[Grant, Depends(allowed(Section.FHIR))]) -> dict[str, Any]:
        """A FHIR R5 Bundle of AuditEvents, one per entry in the role's scope."""
        log_ = ledger()
        stored = log_.log_identity()
        rows = [r for r in log_.raw_rows() if grant.admits(json.loads(r[1]))]
        return fhir.bundle(rows, origin=stored[0] if stored else log_.url)

    @app.get("/report", response_class=HTMLResponse, responses=_DENIED, tags=["report"])
    def report_page(grant: Annotated[Grant, Depends(allowed(Section.REPORT))]) -> HTMLResponse:
        """The report (as `medfed report` writes it), scoped to the caller's role."""
        size = reader.size()
        key = (grant.role, size)
        with settings._lock:
            page = settings._report_cache.get(key)
        if page is None:
            page = report.render(
                report.collect(settings.url, identities=settings.identities, grant=grant)
            )
            with settings._lock:
                if len(settings._report_cache) >= _REPORTS_KEPT:  # drop the oldest
                    settings._report_cache.pop(next(iter(settings._report_cache)))
                settings._report_cache[key] = page
        return HTMLResponse(page)

    @app.get("/", include_in_schema=False)
    def home() -> Response:
        return RedirectResponse("/report")

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form() -> HTMLResponse:
        return HTMLResponse(_LOGIN)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """A browser's way in: the token, posted once, becomes an HttpOnly cookie."""
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        if authenticate(settings.grants, token) is None:
            return HTMLResponse(_LOGIN.replace("<!--msg-->", "<p>Unknown token.</p>"), 401)
        response = RedirectResponse("/report", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    return app


def _endpoint(request: Request) -> str:
    """The route's template (e.g. /api/lineage/{model}), never a parameter's value."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "(no such route)"


_LOGIN = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>medfed ledger: sign in</title></head>
<body style="font: 14px system-ui, sans-serif; margin: 3rem auto; max-width: 30rem">
<h1>medfed ledger</h1><!--msg-->
<form method="post" action="/login"><label>Access token
<input name="token" type="password" autocomplete="off" size="48"></label>
<button type="submit">Open the report</button></form></body></html>"""
