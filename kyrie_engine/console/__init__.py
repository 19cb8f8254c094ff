"""The operator console at /console: the queue at a glance and each job's story, in the browser.

Off unless KYRIE_CONSOLE_TOKEN is set (kyrie_engine.api.build_app mounts it
then).  Server-rendered HTML (Jinja2 templates in templates/), one stylesheet
and one small script in static/, charts as inline SVG: no build step and
nothing fetched at run time.  An operator's view of every workspace.
"""

from kyrie_engine.console.routes import PUBLIC, Console, routes

__all__ = ["PUBLIC", "Console", "routes"]
