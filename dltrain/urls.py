"""Credentials in URLs: found, refused where they would be stored, and redacted wherever a URL
is printed or written.

One place for the rule, imported by the config (refuse), the data stages (download, freshness)
and the registry code (MLflow's tracking URI), so every message redacts the same way. The
standard library only: the freshness check imports it on every run.
"""

from __future__ import annotations

import re
import urllib.parse

MASK = "***"
# scheme://user:password@ anywhere in a text (an error message that quotes a URL).
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):(?P<secret>[^/\s@]+)@")


def password_of(url: str) -> str | None:
    """The password in `url`'s user info (`scheme://user:password@host`), or None."""
    try:
        return urllib.parse.urlsplit(url).password or None
    except ValueError:  # an unparsable netloc (a bad port): look for the pattern instead
        match = _USERINFO.search(url)
        return match.group("secret") if match else None


def redact_url(url: str) -> str:
    """`url` with its password shown as `***` (the user name and everything else kept)."""
    try:
        parts = urllib.parse.urlsplit(url)
        if not parts.password:
            return redact_text(url)
    except ValueError:
        return redact_text(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{hostport}"))


def redact_text(text: str, url: str | None = None) -> str:
    """`text` (a message that may quote a URL) with every `scheme://user:password@` password,
    and `url`'s password as written (percent-encoded) or decoded, shown as `***`."""
    text = _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    password = password_of(url) if url else None
    if password:
        for form in {password, urllib.parse.unquote(password)}:
            text = text.replace(form, MASK)
    return text
