"""The admin API's application: :func:`create_app` wires the parts together.

The app must be served with its ASGI lifespan (Hypercorn does that, and so
does ``app.test_app()`` in tests): a deferred destroy runs in the nursery
that Quart-Trio opens for the lifespan.
"""

from __future__ import annotations

from collections.abc import Iterable

from quart_schema import HttpSecurityScheme, Info, QuartSchema
from quart_trio import QuartTrio

import pop3d

from . import cluster, docs, events, ui
from .access import BearerToken, CorsOrigins, install_access, install_browser_guard, install_cors
from .errors import install_error_handlers
from .metrics import new_registry
from .openapi import AdminOpenAPIProvider
from .routes import EXTENSION, AdminSettings, blueprint

__all__ = ["create_app"]


def create_app(*, token: str | None = None, cors_origins: Iterable[str] = (), instance: str | None = None) -> QuartTrio:
    """A new admin API app over the server objects of this process.

    With ``token``, every endpoint requires ``Authorization: Bearer
    <token>`` but ``/healthz``, the OpenAPI document at ``/openapi.json``
    and the browsable page at ``/docs`` (Swagger UI, served from this host
    under ``/docs/static/``; the token is entered in the page).  Whether
    the app may listen on a given address is decided by
    :func:`admin.check_bind` (which :func:`admin.serve_admin` calls).

    ``cors_origins`` (``scheme://host[:port]`` each) lets pages of those web
    origins call the API from a browser: see :func:`admin.access.install_cors`.
    A bad origin raises :class:`ValueError`.  ``instance`` names this process
    in ``/metrics`` (``pop3d_instance_info``).
    """
    cors = CorsOrigins(cors_origins)  # first: a bad origin fails before anything is built
    app = QuartTrio("pop3d.admin")
    bearer = BearerToken(token) if token else None
    app.extensions[EXTENSION] = AdminSettings(token=bearer, registry=new_registry(instance=instance))
    # A deferred destroy goes on by itself once the server is exiting; its
    # background task need not hold up the API's shutdown.
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = None
    QuartSchema(
        app,
        info=Info(title="pop3d admin API", version=pop3d.__version__),
        # One browsable page is enough, and it is admin.docs's: quart-schema's
        # pages load their scripts from CDNs.
        redoc_ui_path=None,
        scalar_ui_path=None,
        swagger_ui_path=None,
        openapi_provider_class=AdminOpenAPIProvider,
        security_schemes={"bearer": HttpSecurityScheme(scheme="bearer")} if bearer else None,
        security=[{"bearer": []}] if bearer else None,
    )
    install_error_handlers(app)
    # Preflights are answered before the token check: browsers send them without the token.
    install_cors(app, cors)
    install_browser_guard(app, cors, bearer)
    install_access(app, bearer)
    app.register_blueprint(blueprint)
    app.register_blueprint(docs.blueprint)
    app.register_blueprint(events.blueprint)
    app.register_blueprint(cluster.blueprint)
    app.register_blueprint(ui.blueprint)
    return app
