"""flowhand: a lean, crash-aware worker daemon for Prefect 3 work pools."""

__version__ = "0.1.0"

#: The Prefect release whose API flowhand speaks (sent in the User-Agent the server parses).
PREFECT_COMPAT_VERSION = "3.8.8"
#: The server API version sent as X-PREFECT-API-VERSION.
PREFECT_API_VERSION = "0.8.4"
