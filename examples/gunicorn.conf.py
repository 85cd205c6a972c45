"""gunicorn settings for the demo: ``make demo``, or ``gunicorn -c gunicorn.conf.py flask_app:app`` here."""

bind = "127.0.0.1:8000"

# Not the default "sync" worker: it reports to the arbiter only between requests, so a
# download that takes longer than `timeout` gets its worker killed mid-stream. A gthread
# worker reports from its event loop while threads stream, so downloads may take hours;
# `threads` is the number of concurrent downloads per worker (more clients queue).
worker_class = "gthread"
workers = 2
threads = 8

# With gthread this only catches a worker whose event loop is stuck; it never limits how
# long a download may take.
timeout = 60
# On restart or stop, running downloads get this long to finish before they are cut off.
graceful_timeout = 120
keepalive = 5

# Import the app once in the arbiter, so the sample library is generated once, before forking.
preload_app = True

# What the middleware logs (refused requests, aborted downloads, a CRC-32 store that cannot be
# used, a missing bucket ...) goes to the "zipmiddleware" logger: into gunicorn's error log, from
# INFO up. (gunicorn configures only its own loggers.)
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"zipmiddleware": {"level": "INFO", "handlers": ["error_console"], "propagate": False}},
}
