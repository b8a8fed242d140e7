"""A strict reader of the Prometheus text format 0.0.4 and OpenMetrics 1.0, for the tests.

It refuses what Prometheus, node_exporter's textfile collector or promtool would refuse, and
what promlint warns of: metadata after samples, families split apart, a name and label set twice,
a missing final newline, bad escapes, timestamps, counters without ``_total``.
"""

import math
import re

METRIC_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")  # colons are for recording rules, not exporters
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TYPES = {"counter", "gauge", "summary", "histogram", "untyped"}
OPENMETRICS_TYPES = {"counter", "gauge", "summary", "histogram", "info", "stateset", "unknown", "gaugehistogram"}
# The sample names each type may use, as suffixes of the family's name.
SUFFIXES = {"counter": ("_total", "_created"), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",),
            "histogram": ("_bucket", "_sum", "_count", "_created")}


class FormatError(AssertionError):
    pass


def parse(text, openmetrics=False):
    """{(sample name, frozenset of labels): value} and {family: type}; FormatError on anything wrong."""
    if not text.endswith("\n"):
        raise FormatError("the exposition does not end in a newline")
    lines = text[:-1].split("\n")
    if openmetrics:
        if lines[-1] != "# EOF":
            raise FormatError("OpenMetrics must end with # EOF")
        lines = lines[:-1]
    samples, types, helps, finished = {}, {}, {}, set()
    family = None
    for number, line in enumerate(lines, 1):
        where = f"line {number}: {line!r}"
        if "\r" in line:
            raise FormatError(f"{where}: carriage return")
        if line.startswith("#"):
            family = _metadata(line, where, openmetrics, family, types, helps, samples, finished)
            continue
        if not line.strip():
            if openmetrics:
                raise FormatError(f"{where}: empty line in OpenMetrics")
            continue
        name, labels, value = _sample(line, where)
        owner = _family_of(name, types, openmetrics)
        if owner is None:
            raise FormatError(f"{where}: sample before the HELP and TYPE of its family")
        if owner != family:
            raise FormatError(f"{where}: sample of {owner} outside its family's block")
        if owner not in helps:
            raise FormatError(f"{where}: {owner} has no HELP")
        key = (name, frozenset(labels.items()))
        if key in samples:
            raise FormatError(f"{where}: the same name and labels twice")
        samples[key] = value
    _lint(types, openmetrics)
    return samples, types


def _metadata(line, where, openmetrics, family, types, helps, samples, finished):
    parts = line.split(" ", 3)
    if len(parts) < 3 or parts[1] not in ("HELP", "TYPE", "UNIT"):
        if openmetrics:
            raise FormatError(f"{where}: a comment OpenMetrics does not allow")
        return family
    keyword, name = parts[1], parts[2]
    if not METRIC_NAME.fullmatch(name):
        raise FormatError(f"{where}: invalid metric name")
    if name != family:
        if name in finished or name in types or name in helps:
            raise FormatError(f"{where}: family {name} is not contiguous")
        if family is not None:
            finished.add(family)
        family = name
    if any(_family_of(sample_name, types, openmetrics) == name for sample_name, _ in samples):
        raise FormatError(f"{where}: metadata after the samples of {name}")
    if keyword == "TYPE":
        kind = parts[3] if len(parts) > 3 else ""
        if kind not in (OPENMETRICS_TYPES if openmetrics else TYPES) or name in types:
            raise FormatError(f"{where}: bad or repeated TYPE")
        types[name] = kind
    elif keyword == "HELP":
        if name in helps:
            raise FormatError(f"{where}: repeated HELP")
        text = parts[3] if len(parts) > 3 else ""
        _check_escapes(text, where, ('\\\\', '\\n', '\\"') if openmetrics else ('\\\\', '\\n'))
        helps[name] = text
    return family


def _family_of(sample_name, types, openmetrics):
    """The declared family a sample name belongs to, or None."""
    for name, kind in types.items():
        plain = ("",) if (kind not in SUFFIXES or not openmetrics and kind == "counter") else ()
        endings = plain + (() if not openmetrics and kind == "counter" else SUFFIXES.get(kind, ()))
        if any(sample_name == name + ending for ending in endings):
            return name
    return None


def _sample(line, where):
    match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
    if not match:
        raise FormatError(f"{where}: not a sample line (or it has a timestamp)")
    name, _, label_text, value_text = match.groups()
    if ":" in name:
        raise FormatError(f"{where}: a colon in a metric name")
    labels = _labels(label_text or "", where)
    if value_text not in ("NaN", "+Inf", "-Inf"):
        try:
            value = float(value_text)
        except ValueError:
            raise FormatError(f"{where}: bad value") from None
        if math.isinf(value) or math.isnan(value):
            raise FormatError(f"{where}: spell infinities and NaN as +Inf, -Inf and NaN")
    else:
        value = float(value_text.replace("+", ""))
    return name, labels, value


def _labels(text, where):
    labels, position = {}, 0
    while position < len(text):
        match = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="').match(text, position)
        if not match:
            raise FormatError(f"{where}: bad label at {text[position:]!r}")
        name, position = match.group(1), match.end()
        if name.startswith("__"):
            raise FormatError(f"{where}: reserved label name {name}")
        value = []
        while True:
            if position >= len(text):
                raise FormatError(f"{where}: unterminated label value")
            char = text[position]
            if char == "\\":
                escaped = text[position + 1:position + 2]
                if escaped not in ("\\", '"', "n"):
                    raise FormatError(f"{where}: bad escape \\{escaped}")
                value.append("\n" if escaped == "n" else escaped)
                position += 2
            elif char == '"':
                position += 1
                break
            elif char == "\n":
                raise FormatError(f"{where}: raw newline in a label value")
            else:
                value.append(char)
                position += 1
        if name in labels:
            raise FormatError(f"{where}: label {name} twice")
        labels[name] = "".join(value)
        if position < len(text):
            if text[position] != ",":
                raise FormatError(f"{where}: labels not separated by commas")
            position += 1
    return labels


def _check_escapes(text, where, allowed):
    position = 0
    while True:
        position = text.find("\\", position)
        if position < 0:
            return
        if text[position:position + 2] not in allowed:
            raise FormatError(f"{where}: bad escape in HELP")
        position += 2


def _lint(types, openmetrics):
    """promlint's rules that apply to what we export."""
    for name, kind in types.items():
        if kind == "counter" and name.endswith("_total") == openmetrics:
            raise FormatError(f"{name}: a counter's name must end in _total (0.0.4), its samples' (OpenMetrics)")
        if kind != "counter" and name.endswith("_total"):
            raise FormatError(f"{name}: a non-counter ending in _total")
        if name.endswith("_timestamp_seconds") and kind != "gauge":
            raise FormatError(f"{name}: a timestamp that is not a gauge")
        if re.search(r"_(s|ms|sec|kb|mb|h|d|minutes|hours|days)$", name):
            raise FormatError(f"{name}: not in base units")
        if re.search(r"[a-z][A-Z]", name):
            raise FormatError(f"{name}: camelCase")
