"""nextaction's stream processor. ``faust -A stream_app worker`` finds :data:`app` here.

The Faust app is imported lazily, so the pure modules of this package (settings, events,
history, errors) can be used without starting Faust's machinery.
"""


def __getattr__(name: str):
    if name == "app":
        from stream_app.app import app

        # Importing the submodule ``stream_app.app`` binds the *module* onto this package; bind
        # the App object instead, so Faust's second look-up of ``stream_app.app`` finds the app.
        globals()["app"] = app
        return app
    raise AttributeError(f"module 'stream_app' has no attribute {name!r}")
