"""Assertions shared by the test files."""


def assert_one_line_error(rc, err, *needles, out=""):
    """A refused command: exit status 2, no traceback, exactly one non-blank line on stderr that
    contains every one of ``needles``. Returns that line."""
    assert rc == 2, (rc, err, out[-2000:])
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def tree_snapshot(root) -> dict:
    """Every path under ``root`` (relative) with its kind, size and modification time: compare two
    snapshots to see that a refused command changed nothing."""
    import os
    import stat

    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (stat.S_ISDIR(st.st_mode), st.st_size, st.st_mtime_ns)
    return out
