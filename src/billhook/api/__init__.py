"""HTTP: the app factory (`app.create_app`), webhook routes, health, metrics; `server.serve`."""
