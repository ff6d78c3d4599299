"""TLS to the API as Prefect's client sets it up, and certificate errors said in one line.

Prefect's settings: `PREFECT_API_SSL_CERT_FILE` (a CA bundle; its default is `SSL_CERT_FILE`)
and `PREFECT_API_TLS_INSECURE_SKIP_VERIFY`. Without a bundle Prefect trusts certifi's; flowhand
does too, and adds the directory `SSL_CERT_DIR` names (OpenSSL's own variable), so a machine's
private CA installed there is trusted as by other OpenSSL programs.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

import certifi

from flowhand.errors import APIUnreachable, ConfigError


@dataclass(frozen=True)
class TLSSettings:
    """How to verify the API's certificate (`api.ssl_cert_file`, `api.tls_insecure_skip_verify`)."""

    cert_file: str | None = None
    insecure_skip_verify: bool = False
    cert_dir: str | None = None


class CertificateError(APIUnreachable):
    """The API's certificate was not trusted: a setting to fix, not an outage to wait out."""


def tls_settings(cert_file: str | None, insecure: bool,
                 environ: Mapping[str, str] | None = None) -> TLSSettings:
    """The settings with Prefect's fallbacks from the environment (SSL_CERT_FILE, SSL_CERT_DIR)."""
    environ = os.environ if environ is None else environ
    return TLSSettings(cert_file=cert_file or environ.get("SSL_CERT_FILE") or None,
                       insecure_skip_verify=insecure,
                       cert_dir=environ.get("SSL_CERT_DIR") or None)


def ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """The context every connection to the API uses; ConfigError when the bundle is unusable."""
    if tls.insecure_skip_verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        ctx = ssl.create_default_context(cafile=tls.cert_file or certifi.where())
        if tls.cert_dir and os.path.isdir(tls.cert_dir):
            ctx.load_verify_locations(capath=tls.cert_dir)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"PREFECT_API_SSL_CERT_FILE={tls.cert_file}: cannot load the CA bundle: "
            f"{getattr(exc, 'strerror', None) or exc}; point it at a PEM file of CA "
            "certificates (api.ssl_cert_file)") from None
    return ctx


def certificate_problem(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind a transport error, if that is what it is."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def certificate_error(api_url: str, tls: TLSSettings,
                      problem: ssl.SSLCertVerificationError) -> CertificateError:
    """One line: the URL, what OpenSSL said, and the setting that fixes it."""
    reason = problem.verify_message or problem.reason or str(problem)
    trusted = (f"the CA bundle {tls.cert_file} (PREFECT_API_SSL_CERT_FILE)" if tls.cert_file
               else "the default CA bundle")
    return CertificateError(
        f"TLS certificate of the Prefect API at {api_url} not trusted ({reason}) by {trusted}: "
        "set PREFECT_API_SSL_CERT_FILE (api.ssl_cert_file) to the PEM file of the CA that "
        "signed it, or, for testing only, PREFECT_API_TLS_INSECURE_SKIP_VERIFY=true")
