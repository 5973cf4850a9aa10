"""The federation's class list: how a label cell becomes a class index, and how two class
lists differ. One home for the rule that the manifest loader, the server's registration check
and the client's relabelling all apply: a label is a class name, or else a class index
written as digits."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from crossfed.common.data.data_errors import DataError


class ClassListError(DataError):
    """A class list is malformed, or labels / another list do not fit it."""


def builtin_class_names() -> list[str]:
    """The built-in synthetic dataset's 12 classes (index = shape * 3 + colour)."""
    from crossfed.common.data.synthetic_shapes import class_names

    return class_names()


def default_class_names(num_classes: int) -> list[str]:
    """Names of a federation that configured none: the built-in data's when the count is
    theirs, else the indices as digits ("0", "1", ...)."""
    builtin = builtin_class_names()
    return builtin if num_classes == len(builtin) else [str(i) for i in range(num_classes)]


def parse_class_list(value: str) -> list[str]:
    """A class list from the command line: comma-separated names, or ``@FILE`` with one name
    per line (blank lines and ``#`` comments skipped)."""
    if value.startswith("@"):
        path = value[1:]
        try:
            with open(path, encoding="utf-8") as handle:
                lines = [line.strip() for line in handle]
        except (OSError, UnicodeDecodeError) as exc:
            raise ClassListError(f"cannot read class list {path}: {exc}") from None
        return check_class_names([n for n in lines if n and not n.startswith("#")])
    return check_class_names(value.split(","))


def check_class_names(names: Sequence[str]) -> list[str]:
    """A usable class list: at least two names, none empty, no duplicates (stripped)."""
    cleaned = [str(n).strip() for n in names]
    if len(cleaned) < 2:
        raise ClassListError(f"a class list needs at least 2 classes, got {len(cleaned)}")
    if any(not n for n in cleaned):
        raise ClassListError("a class list has an empty class name")
    dupes = [name for name, count in Counter(cleaned).items() if count > 1]
    if dupes:
        raise ClassListError(f"class names must be unique; repeated: {', '.join(dupes[:5])}")
    return cleaned


def label_index(label: str, index: Mapping[str, int]) -> int | None:
    """Class index of a label cell: its name, else its digits if below the class count."""
    found = index.get(label)
    if found is not None:
        return found
    if label.isdigit() and int(label) < len(index):
        return int(label)
    return None


def unknown_labels(labels: Sequence[str], class_names: Sequence[str]) -> list[str]:
    """The labels (in first-seen order) that name no class of ``class_names``."""
    index = {name: i for i, name in enumerate(class_names)}
    out: list[str] = []
    for label in labels:
        if label_index(label, index) is None and label not in out:
            out.append(label)
    return out


def _quoted(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def describe_difference(theirs: Sequence[str], ours: Sequence[str]) -> str:
    """One phrase saying how class list ``theirs`` differs from ``ours`` ('' when equal)."""
    if list(theirs) == list(ours):
        return ""
    missing = [n for n in ours if n not in theirs]
    extra = [n for n in theirs if n not in ours]
    parts = []
    if missing:
        parts.append(f"lacks {_quoted(missing)}")
    if extra:
        parts.append(f"has extra {_quoted(extra)}")
    if not parts:
        at = next(i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b)
        parts.append(f"orders them differently (index {at}: {theirs[at]!r}, expected {ours[at]!r})")
    return " and ".join(parts)


def relabel_map(local_names: Sequence[str], class_names: Sequence[str]) -> list[int]:
    """For each local class name (a file's own label set), its index in the federation's
    ``class_names``; raises ClassListError naming every label that fits no class."""
    index = {name: i for i, name in enumerate(class_names)}
    mapping = [label_index(name, index) for name in local_names]
    unknown = [name for name, i in zip(local_names, mapping, strict=True) if i is None]
    if unknown:
        raise ClassListError(
            f"labels {_quoted(unknown)} are not classes of the federation "
            f"({_quoted(list(class_names))})"
        )
    return [i for i in mapping if i is not None]
