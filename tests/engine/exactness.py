"""The one exactness assertion of the engine tests: a session equals an independent fresh build
of its current text (DocumentSession.reference_check re-tokenizes and re-chunks the text and
runs the dense VQ forward; nothing comes from the session's stored ids or positions)."""

from __future__ import annotations

TOL = 1e-9  # float64 incremental vs dense: measured ~1e-16


def assert_exact(session, indices=None) -> dict:
    check = session.reference_check(indices)
    for key in ("token_mismatch", "layout_mismatch", "row_id_mismatches",
                "position_mismatches", "code_mismatches"):
        assert check[key] == 0, check
    assert check["codes_checked"] > 0 or indices is not None, check
    assert check["max_abs_logit_diff"] <= TOL, check
    return check
