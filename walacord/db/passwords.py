"""The database role's password: where setup-database reads it and how it compares it.

The password never travels as a command-line argument, where `ps` and shell history
would show it. The server receives only a SCRAM verifier computed on this side.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

from walacord.errors import DatabaseSetupError

CREDENTIAL_NAME = "database-password"
PASSWORD_FILE_ENV = "WALACORD_DB_PASSWORD_FILE"


def read_password(path_option: str | None) -> tuple[str, str] | None:
    """Return (password, source) or None when no source is configured.

    Sources in order: the --password-file option, the file named by env
    WALACORD_DB_PASSWORD_FILE, then the systemd credential `database-password` in
    $CREDENTIALS_DIRECTORY. A source that is named but unreadable or empty raises
    DatabaseSetupError; one trailing newline is stripped.
    """
    if path_option:
        return _read_file(Path(path_option)), f"--password-file {path_option}"

    from_env = os.environ.get(PASSWORD_FILE_ENV)
    if from_env:
        return _read_file(Path(from_env)), f"{PASSWORD_FILE_ENV}={from_env}"

    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        path = Path(credentials) / CREDENTIAL_NAME
        if path.exists():
            return _read_file(path), f"credential {CREDENTIAL_NAME}"
    return None


def _read_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatabaseSetupError(f"cannot read password file {path}: {exc.strerror}") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise DatabaseSetupError(f"password file {path} is empty")
    return password


def verifier_matches(stored: str, role: str, password: str) -> bool:
    """Tell whether `password` matches a pg_authid.rolpassword value (SCRAM or md5).

    NOTE: the password is not SASLprep-normalised, so a non-ASCII password that the
    server normalises may compare unequal; setup-database then sets it again.
    """
    if stored.startswith("SCRAM-SHA-256$"):
        return _scram_matches(stored, password)
    if stored.startswith("md5"):
        digest = hashlib.md5((password + role).encode(), usedforsecurity=False).hexdigest()
        return hmac.compare_digest(stored, "md5" + digest)
    return False


def _scram_matches(stored: str, password: str) -> bool:
    # Format from RFC 5803 as PostgreSQL stores it:
    # SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, all keys base64.
    try:
        _, params, keys = stored.split("$")
        iterations_text, salt_b64 = params.split(":")
        stored_key_b64, _server_key = keys.split(":")
        salt = base64.b64decode(salt_b64)
        stored_key = base64.b64decode(stored_key_b64)
        iterations = int(iterations_text)
    except ValueError:
        return False

    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key)
