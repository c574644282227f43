"""The web UI (Gradio): layout (ui), event handlers (handlers) and figures (plots), on top of the engine
in explorer/."""
