"""The web UI (Gradio) on top of the engine in explorer/: layout (ui, tabs), event handlers (handlers, with
the session and its named output groups in session), the in-browser step view (scrub_view + .js/.css),
figures (plots), per-step notes (story), the rows every view and the API share (rows), the script API (api),
and one module per view (compare, export, region, insight, uploads)."""
