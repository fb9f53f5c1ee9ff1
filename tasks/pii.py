"""PII masking: emails, phone numbers and IP addresses become <EMAIL>, <PHONE>, <IP_ADDRESS>.

Regexes find candidates; IPs are then validated by `ipaddress`, phones by digit count.
Order matters: emails first (their domains may hold digits), then IPs (IPv6 before IPv4, whose
form it may embed; an IPv4 address would otherwise look like a dotted phone number), then phones.

Precision over recall for phones, because a false positive destroys real content (years,
dates, prices, ISBNs, part numbers) in training text:
- matched: international numbers written with a leading + (9-15 digits with the country code;
  E.164 caps at 15), and US/NANP numbers with separators: (555) 123-4567, 555-123-4567,
  555.123.4567, 555 123 4567, 1-800-555-1234; either may carry an extension (ext. 12, x12).
- not matched: national formats other than US without + (020 7946 0958, 030 1234567), and
  unseparated digit runs (5551234567): these are indistinguishable from IDs, ISBNs and counts.
- any separated 3-3-4 digit groups whose first digit is 2-9 match, so a rare non-phone number
  in that shape is masked; a number glued to a letter, '+', '.' or '-' (ABC-555-123-4567) is not.
Emails: plain addresses only; obfuscated ones (jane at example dot com) are kept.
IP trade-offs: a four-part version string (1.2.3.4) is a valid IPv4 address and is masked;
three-part versions are not. IPv6 candidates must contain a digit, so words made of hex
letters around '::' (Bad::Cafe) are not masked; a Python slice such as x[1::2] is.
"""
from __future__ import annotations

import ipaddress
import re

from core.config import PiiConfig

TAGS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>"}

EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][\w.%+-]*@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")

# an address ends where no word character follows, nor '.' and a digit (1.2.3.4.5 is not an address);
# ',' and '-' may follow: lists and ranges of addresses (10.0.0.1-10.0.0.9) are masked whole
IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?!\w|\.\d)")
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)")

_EXT = r"(?:\s*(?:ext\.?|extension|x)\s*\d{1,5})?"
_END = r"(?!\w|[.-]\d)"  # 555-123-4567-89 and 555.123.4567.1 are part numbers, not phones
_SEP = r"[ .-]"
PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    # +<country> then digit groups split by one separator; '(0)' is the UK/DE trunk prefix
    r"\+\d{1,3}(?:" + _SEP + r"?(?:\(0\)" + _SEP + r"?)?\(?\d{1,4}\)?){2,6}"
    r"|"
    # US: optional 1, area code (NANP: first digit 2-9), exchange, line
    r"(?:1" + _SEP + r"?)?(?:\([2-9]\d\d\)" + _SEP + r"?|[2-9]\d\d" + _SEP + r")\d{3}" + _SEP + r"\d{4}"
    r")" + _EXT + _END)


def _valid_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)  # rejects 999.1.1.1, leading zeros, malformed '::' forms
    except ValueError:
        return False
    return ":" not in s or any(c.isdigit() for c in s)


def _valid_phone(s: str) -> bool:
    digits = sum(c.isdigit() for c in re.sub(r"(?:ext\.?|extension|x)\s*\d+$", "", s))
    return 9 <= digits <= 15 if s.startswith("+") else True  # E.164: at most 15; shorter '+' runs are scores, deltas


def mask_pii(text: str, cfg: PiiConfig) -> tuple[str, dict[str, int]]:
    """Masked text and the number of replacements per type ('email', 'phone', 'ip')."""
    counts = dict.fromkeys(TAGS, 0)
    if not cfg.enabled:
        return text, counts

    def sub(kind: str, pattern: re.Pattern, valid=lambda s: True) -> None:
        nonlocal text

        def repl(m: re.Match) -> str:
            if not valid(m.group()):
                return m.group()
            counts[kind] += 1
            return TAGS[kind]
        text = pattern.sub(repl, text)

    # the `in` checks skip a regex scan of the whole text for most documents
    if cfg.email and "@" in text:
        sub("email", EMAIL)
    if cfg.ip:
        if ":" in text:
            sub("ip", IPV6, _valid_ip)  # first: ::ffff:192.0.2.1 is one address, not an IPv4 inside
        sub("ip", IPV4, _valid_ip)
    if cfg.phone:
        sub("phone", PHONE, _valid_phone)
    return text, counts
