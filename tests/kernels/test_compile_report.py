"""The SASS counting of kernels/compile_report.py on a hand-written listing (no compiler needed)."""

import pytest

from odyssey.kernels.compile_report import _parse_set, count_sass

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   SHFL.BFLY PT, R2, R3, 0x7, 0x1f ;
        /*0020*/                   MUFU.EX2 R4, R4 ;
        /*0030*/                   FFMA R5, R4, R5, R6 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   FMUL R7, R5, R5 ;
        /*0060*/                   BRA 0x0 ;
        /*0070*/                   EXIT ;
"""


def test_count_sass_finds_the_innermost_loop_with_exp2():
    total, loop = count_sass(LISTING)
    assert total["MOV"] == 1 and total["BRA"] == 2 and total["EXIT"] == 1
    # the loop 0x20..0x40 holds MUFU; the outer one 0x0..0x60 is larger
    assert dict(loop) == {"MUFU": 1, "FFMA": 1, "BRA": 1}


def test_parse_set_takes_python_literals():
    assert _parse_set(["ADJOINT=5", "LANE_FLIP=True", "num_warps=1"]) == {"ADJOINT": 5, "LANE_FLIP": True,
                                                                          "num_warps": 1}
    with pytest.raises(SystemExit, match="Python literal"):
        _parse_set(["ADJOINT=five"])
