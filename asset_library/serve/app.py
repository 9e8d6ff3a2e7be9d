"""The JSON API over one library, read-only: lookups, bytes, thumbnails, search, macros, pages.

Nothing a request does writes the library's data: the catalog is read-only, and thumbnails go
to the service's own cache folder. The one file it may add is the record of a stored object it
found damaged (its bytes are not its key's), which ingests and checks read to repair it. Errors
are JSON ``{"detail": ...}`` naming the bad input; a bad parameter is always a 422.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import duckdb
import uvicorn
from fastapi import APIRouter, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool

from asset_library.ids import InvalidIdError, check_md5
from asset_library.lake.catalog import MACRO_HELP, macro_signature
from asset_library.layout import LibraryLayout
from asset_library.library import ImageNotFoundError, Library
from asset_library.search.thresholds import DEFAULT_CONFIRM_DISTANCE, DEFAULT_MIN_QUALITY
from asset_library.serve import reads
from asset_library.serve.auth import TokenRequired
from asset_library.serve.batch_states import ShardStates
from asset_library.serve.settings import ServeSettings
from asset_library.serve.thumbs import ThumbnailCache, ThumbnailError
from asset_library.serve.uploads import BodyLimit, DecodePool, PoolBusy, header_pixels
from asset_library.serving import (
    MAX_ATTRIBUTE_PAGE,
    MAX_SOURCES_PAGE,
    SqliteBackend,
    StoreUnavailable,
)
from asset_library.similarity import IndexNotReady
from asset_library.storage import (
    DamagedObjectError,
    DamageRecord,
    ObjectStoreError,
    object_key,
    read_image,
)

T = TypeVar("T")
log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
#: Content-addressed: the bytes behind a key never change.
IMMUTABLE = "private, max-age=31536000, immutable"

Limit = Annotated[int, Query(ge=1, le=1000, description="rows per page")]
Offset = Annotated[int, Query(ge=0, le=reads.MAX_OFFSET, description="rows to skip")]

router = APIRouter()


def create_app(settings: ServeSettings) -> FastAPI:
    """The service: the API, the gallery and its static files, behind the upload cap and, when
    a token is set, the token rule."""
    from asset_library.serve.gallery import router as gallery_router

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.decodes = DecodePool(
            settings.upload_workers, settings.upload_wait_s, settings.decode_pixels
        )
        try:
            yield
        finally:
            app.state.decodes.close()

    app = FastAPI(
        title="asset-library",
        summary="A read-only image library: lookups, near-duplicate search, catalog macros.",
        version="1",
        docs_url=None,  # Swagger UI loads from a CDN; /docs is a plain page built from the schema
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.libraries = reads.LibraryPool(settings.library, settings.readers)
    app.state.loop_library = Library(settings.library)  # the event loop's own: store reads only
    app.state.thumbs = ThumbnailCache(settings.cache_dir / "thumbs", settings.thumb_size)
    app.state.shard_states = ShardStates(LibraryLayout.at(settings.library))
    app.include_router(router)
    app.include_router(gallery_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for error, status in (
        (InvalidIdError, 422),
        (reads.MacroArgumentsError, 422),
        (IndexNotReady, 503),
        (PoolBusy, 503),
        (ObjectStoreError, 502),  # the catalog has the image but its store fails to give it
    ):
        app.add_exception_handler(error, _status_of(status))
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(DamagedObjectError, _damaged_object)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    if settings.token:
        app.add_middleware(TokenRequired, token=settings.token)  # outermost: checked first
    return app


def serve(
    settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, *, access_log: bool = False
) -> None:
    """Run the service in this process until interrupted. No line per request unless
    ``access_log``: formatting one is a measurable share of a lookup's cost."""
    print(f"library   {settings.library}", flush=True)
    print(f"cache     {settings.cache_dir}", flush=True)
    print(f"token     {'required' if settings.token else 'none (loopback only)'}", flush=True)
    uvicorn.run(
        create_app(settings), host=host, port=port, server_header=False, access_log=access_log
    )


def _status_of(status: int) -> Callable[[Request, Exception], Any]:
    async def handle(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=status)

    return handle


def validation_message(error: RequestValidationError) -> str:
    """One sentence per bad parameter, each naming it and the value given."""
    parts = []
    for problem in error.errors():
        where = [str(part) for part in problem.get("loc", ()) if part not in ("query", "path")]
        name = ".".join(where) or "the request"
        given = problem.get("input")
        shown = f" (given {given!r})" if isinstance(given, str | int | float) else ""
        parts.append(f"{name}: {problem.get('msg', 'invalid')}{shown}")
    return "; ".join(parts)


async def _invalid_request(request: Request, error: Exception) -> Response:
    """Every bad parameter is a 422 naming it: JSON on the API, a page on the gallery."""
    assert isinstance(error, RequestValidationError)
    message = validation_message(error)
    route = request.scope.get("route")
    if route is not None and not getattr(route, "include_in_schema", True):
        from asset_library.serve.pages import error_page

        return error_page("Bad request", message, 422)
    return JSONResponse({"detail": message}, status_code=422)


async def _damaged_object(request: Request, error: Exception) -> Response:
    """A 502 naming the object, and the md5 recorded where ingests and checks look for it."""
    assert isinstance(error, DamagedObjectError)
    settings: ServeSettings = request.app.state.settings
    try:
        DamageRecord(LibraryLayout.at(settings.library).damaged_objects_dir).add(error)
    except OSError as failed:  # a library on a read-only mount: the answer still says it
        log.warning("could not record the damaged object of %s: %s", error.md5, failed)
    log.error("%s", error)
    return JSONResponse({"detail": str(error)}, status_code=502)


def with_library(request: Request, work: Callable[[Library], T]) -> T:
    """Run ``work`` on one of the service's library handles."""
    with request.app.state.libraries.borrow() as library:
        return work(library)


def page_body(request: Request, page: reads.Page, key: str) -> dict[str, Any]:
    """A page as JSON: its slice under ``key``, the total, and a link to the next page."""
    following = None
    if page.has_next:
        following = str(request.url.include_query_params(offset=page.offset + page.limit))
    return {
        "total": page.total,
        "limit": page.limit,
        "offset": page.offset,
        "next": following,
        key: page.items,
    }


def _known(library: Library, md5: str) -> str:
    """The image's format; 404 if the library does not have it."""
    found = reads.image_format(library, md5)
    if found is None:
        raise HTTPException(404, f"no image with md5 {md5} in the library")
    return found


def _pixels(library: Library, md5: str) -> int:
    """What decoding the image costs, in pixels; 404 if the library does not have it."""
    found = reads.image_pixels(library, md5)
    if found is None:
        raise HTTPException(404, f"no image with md5 {md5} in the library")
    return found


def _etag_matches(request: Request, etag: str) -> bool:
    header = request.headers.get("if-none-match")
    if header is None:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


#: A record as JSON: the serializer FastAPI applies to a ``dict[str, Any]`` answer, without
#: validating it again first.
_RECORD = TypeAdapter(dict[str, Any])


@router.get(
    "/images/{md5}",
    summary="An image's record, as Library.lookup returns it",
    response_class=Response,
    responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}},
)
async def image(request: Request, md5: str) -> Response:
    # On the event loop from a SQLite store (one primary-key statement in a local file:
    # cheaper than a hand-off to a worker thread); in a worker thread, on its own connection,
    # from a PostgreSQL store (a network round trip) or from the lake when the store cannot.
    key = check_md5(md5)
    loop_library = request.app.state.loop_library
    try:
        if not isinstance(loop_library.serving_backend, SqliteBackend):
            raise StoreUnavailable("not a local file")
        found = loop_library.lookup(key, fallback=False)
    except StoreUnavailable:
        found = await run_in_threadpool(with_library, request, lambda library: library.lookup(key))
    if found is None:
        raise HTTPException(404, f"no image with md5 {key} in the library")
    return Response(_RECORD.dump_json(found), media_type="application/json")


@router.get(
    "/images/{md5}/sources",
    summary="A page of the image's sources in ingest order, with their count",
)
def image_sources(
    request: Request,
    md5: str,
    limit: Annotated[int, Query(ge=1, le=MAX_SOURCES_PAGE, description="sources per page")] = 100,
    offset: Offset = 0,
) -> dict[str, Any]:
    key = check_md5(md5)
    try:
        page = with_library(request, lambda library: library.sources(key, limit, offset))
    except ImageNotFoundError:
        raise HTTPException(404, f"no image with md5 {key} in the library") from None
    following = None
    if offset + limit < page["sources_count"]:
        following = str(request.url.include_query_params(offset=offset + limit))
    return {**page, "next": following}


@router.get(
    "/images/{md5}/bytes",
    summary="The stored bytes (ETag = md5; If-None-Match gives 304)",
    response_class=Response,
)
def image_bytes(request: Request, md5: str) -> Response:
    key = check_md5(md5)
    etag = f'"{key}"'
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE}

    def read(library: Library) -> Response:
        kind = _known(library, key)
        if _etag_matches(request, etag):
            return Response(status_code=304, headers=headers)
        data = read_image(request.app.state.libraries.object_store(library), key)
        media = reads.MEDIA_TYPES.get(kind, "application/octet-stream")
        return Response(data, media_type=media, headers=headers)

    return with_library(request, read)


@router.get(
    "/images/{md5}/thumb",
    summary="A JPEG thumbnail (longest side 256 px), made once and cached",
    response_class=Response,
)
async def image_thumb(request: Request, md5: str) -> Response:
    key = check_md5(md5)
    thumbs: ThumbnailCache = request.app.state.thumbs
    etag = f'"{key}-{thumbs.size}"'
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
    thumb = await run_in_threadpool(thumbs.cached, key)
    if thumb is None:
        pixels = await run_in_threadpool(with_library, request, lambda lib: _pixels(lib, key))

        def make(library: Library) -> bytes:
            store = request.app.state.libraries.object_store(library)
            try:
                return thumbs.make(key, read_image(store, key))
            except ThumbnailError as error:
                where = store.uri(object_key(key))
                raise HTTPException(502, f"no thumbnail of {where}: {error}") from None

        thumb = await request.app.state.decodes.run(lambda: with_library(request, make), pixels)
    if _etag_matches(request, etag):
        return Response(status_code=304, headers=headers)
    return Response(thumb, media_type="image/jpeg", headers=headers)


@router.post("/similar", summary="Images near an uploaded image (field 'image') or ?md5=")
async def similar(
    request: Request,
    image: Annotated[UploadFile | None, File(description="an image file")] = None,
    md5: Annotated[str | None, Query(description="an image of the library")] = None,
    max_distance: Annotated[int | None, Query(ge=0, le=64, description="bits (8)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    hash: Literal["phash", "ahash", "dhash"] = "phash",
    transforms: Literal["none", "dihedral"] = "none",
    min_quality: Annotated[
        int, Query(ge=0, le=100, description="leave out flatter images; 0 keeps them")
    ] = DEFAULT_MIN_QUALITY,
    confirm: Annotated[
        int,
        Query(
            ge=0,
            le=64,
            description="keep a match only when a second hash (dHash; pHash for hash=dhash) "
            "is within this many bits too; 64 keeps every match",
        ),
    ] = DEFAULT_CONFIRM_DISTANCE,
) -> dict[str, Any]:
    if (image is None) == (md5 is None):
        raise HTTPException(
            422, "give either an image (multipart field 'image') or ?md5=, and not both"
        )
    options: dict[str, Any] = {
        "max_distance": max_distance,
        "limit": limit,
        "hash": hash,
        "transforms": transforms,
        "min_quality": min_quality or None,
        "confirm": confirm,
    }
    try:
        if md5 is not None:
            key = check_md5(md5)

            def by_md5(library: Library) -> list[dict[str, Any]]:
                try:
                    return library.similar(key, **options)
                except ValueError:
                    _known(library, key)  # 404 if that is why; looked up on failure only
                    raise

            if transforms == "none":  # the stored hashes: nothing to decode
                found = await run_in_threadpool(with_library, request, by_md5)
            else:
                pixels = await run_in_threadpool(
                    with_library, request, lambda lib: _pixels(lib, key)
                )
                found = await request.app.state.decodes.run(
                    lambda: with_library(request, by_md5), pixels
                )
        else:
            assert image is not None  # checked above: exactly one of image and md5
            data = await image.read()
            await image.close()
            if not data:
                raise HTTPException(422, f"the uploaded file {image.filename!r} is empty")
            pixels = await run_in_threadpool(header_pixels, data)
            found = await request.app.state.decodes.run(
                lambda: with_library(request, lambda library: library.similar(data, **options)),
                pixels,
            )
    except InvalidIdError:
        raise
    except ValueError as error:  # not an image, one too flat to search with, bad options
        name = image.filename if image is not None else md5
        raise HTTPException(422, f"{name or 'the upload'}: {error}") from None
    return {"count": len(found), "results": found}


#: The macros ``/query/{macro}`` takes, with their arguments (the query string's names).
_MACROS_TAKEN = "The macros and their arguments: " + "; ".join(
    f"`{macro_signature(name)}`: {MACRO_HELP[name]}" for name in MACRO_HELP
)


@router.get(
    "/query/{macro}",
    summary="A page of a catalog table macro; arguments by name",
    description=_MACROS_TAKEN,
)
def query_macro(request: Request, macro: str, limit: Limit = 50, offset: Offset = 0) -> Any:
    try:
        reads.macro_arguments(macro)
    except KeyError as error:
        raise HTTPException(404, error.args[0]) from None
    items = [(k, v) for k, v in request.query_params.multi_items() if k not in ("limit", "offset")]
    repeated = sorted(k for k, n in Counter(k for k, _ in items).items() if n > 1)
    if repeated:
        raise HTTPException(422, f"{macro}: give each argument once, not {', '.join(repeated)}")
    given = dict(items)
    try:
        page = with_library(request, lambda lib: reads.call_macro(lib, macro, given, limit, offset))
    except duckdb.Error as error:
        shown = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise HTTPException(422, f"{macro}({shown}): {error}") from None
    return {"macro": macro, "arguments": given, **page_body(request, page, "rows")}


Attribute = Annotated[str, Query(min_length=1, description="the attribute's name")]
Value = Annotated[str, Query(description="the value's text, as the cube holds it")]
Origin = Annotated[
    Literal["derived", "manifest"] | None, Query(description="where the value came from; any")
]
PageSize = Annotated[
    int, Query(ge=1, le=MAX_ATTRIBUTE_PAGE, description="rows per page (at most 1000)")
]
Cursor = Annotated[
    str | None, Query(description="the cursor of the page before (its last md5); none: the first")
]


def _attribute_page(request: Request, page: dict[str, Any]) -> Response:
    """A page of images having an attribute value as JSON, with the link to the next page
    (serialized as a record is: FastAPI's check of each row first doubled its cost)."""
    cursor = page["cursor"]
    following = None if cursor is None else str(request.url.include_query_params(after=cursor))
    return Response(_RECORD.dump_json({**page, "next": following}), media_type="application/json")


_PAGE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {"schema": {"type": "object"}}}}
}


@router.get(
    "/attributes/images",
    summary="A page of the images having an attribute value, in md5 order, after a cursor",
    response_class=Response,
    responses=_PAGE_RESPONSE,
)
def attribute_images(
    request: Request,
    attr: Attribute,
    val: Value,
    origin: Origin = None,
    limit: PageSize = 100,
    after: Cursor = None,
) -> Response:
    page = with_library(
        request,
        lambda lib: lib.images_with_attribute(attr, val, origin=origin, limit=limit, after=after),
    )
    return _attribute_page(request, page)


@router.get(
    "/attributes/md5s",
    summary="The md5s (and buckets) of those images: a page after a cursor",
    response_class=Response,
    responses=_PAGE_RESPONSE,
)
def attribute_md5s(
    request: Request,
    attr: Attribute,
    val: Value,
    origin: Origin = None,
    limit: PageSize = 100,
    after: Cursor = None,
) -> Response:
    page = with_library(
        request,
        lambda lib: lib.md5s_with_attribute(attr, val, origin=origin, limit=limit, after=after),
    )
    return _attribute_page(request, page)


@router.get("/duplicates", summary="Near-duplicate groups, largest first")
def duplicates(request: Request, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    page = with_library(request, lambda lib: reads.duplicate_groups(lib, limit, offset))
    return page_body(request, page, "groups")


@router.get("/duplicates/{group}", summary="The images of one near-duplicate group")
def duplicate_group(
    request: Request, group: Annotated[int, PathParam(ge=0, le=reads.MAX_ID)]
) -> dict[str, Any]:
    members = with_library(request, lambda lib: reads.group_members(lib, group))
    if not members:
        raise HTTPException(404, f"no near-duplicate group {group}")
    return {"group": group, "size": len(members), "images": members}


@router.get("/rejects", summary="Rejected sources, with their reason; filter by reason")
def rejects(
    request: Request, reason: str | None = None, limit: Limit = 50, offset: Offset = 0
) -> dict[str, Any]:
    page = with_library(request, lambda lib: reads.rejects(lib, reason, limit, offset))
    return page_body(request, page, "rejects")


@router.get("/stats", summary="Images by format, rejects by reason, groups, batches")
def stats(request: Request) -> dict[str, Any]:
    return with_library(request, reads.stats)
