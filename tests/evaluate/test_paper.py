"""The transcribed paper numbers: rows the paper prints twice must agree."""
import pytest

from us3l_jax import paper


def values(key, widths):
    row = paper.get(key)
    return [row.at(w) for w in widths]


def test_tables_agree_where_the_paper_repeats_a_result():
    # Table 16 extends Table 2's "Ours (800ep)" rows to 17 widths.
    for bb in ("resnet18", "resnet50"):
        assert values(f"table2/{bb}/ours_800ep", paper.W9) == values(f"table16/{bb}", paper.W9)
    # Table 8's full method (DS + GR) is Table 2's "Ours" at Table 8's widths.
    for bb in ("resnet18", "resnet50", "mobilenet_v2"):
        assert values(f"table8/{bb}/ds_gr", paper.W6) == values(f"table2/{bb}/ours", paper.W6)
    # The baseline of the ablations (Table 7 case 13) is Table 13 case 2 and Table 14 case 1,
    # and Table 8's R-18 baseline; Table 14 case 3 (G=8, alpha=0.05) is Table 8's GR row.
    base = values("table7/case13", paper.W9)
    assert base == values("table13/case2", paper.W9) == values("table14/case1", paper.W9)
    assert values("table8/resnet18/baseline", paper.W6) == values("table7/case13", paper.W6)
    assert values("table8/resnet18/gr", paper.W6) == values("table14/case3", paper.W6)
    # Table 15 repeats Table 2's individual BYOL / SimCLR and Table 14 cases 1 and 3.
    for m in ("byol", "simclr"):
        assert values(f"table15/{m}/none", paper.W9) == values(f"table2/resnet18/{m}", paper.W9)
    assert values("table15/ours/none", paper.W9) == values("table14/case1", paper.W9)
    assert values("table15/ours/gr", paper.W9) == values("table14/case3", paper.W9)
    # US+SimSiam on R-18 is Table 7 case 2; US+SimCLR is case 14.
    assert values("table2/resnet18/us_simsiam", paper.W9) == values("table7/case2", paper.W9)
    assert values("table2/resnet18/us_simclr", paper.W9) == values("table7/case14", paper.W9)


def test_rows_cover_the_tables_and_mark_collapse():
    assert sum(k.startswith("table7/") for k in paper.ROWS) == 17
    assert sum(k.startswith("table13/") for k in paper.ROWS) == 5
    assert sum(k.startswith("table14/") for k in paper.ROWS) == 9
    assert paper.get("table7/case1").at(1.0) is None  # collapsed
    assert paper.get("table2/mobilenet_v2/us_simsiam").at(0.5) is None
    assert paper.get("table2/resnet18/ours").at(0.25) == 60.4
    assert paper.get("table16/resnet18").at(0.275) == 63.1
    assert paper.get("table2/resnet18/ours").at(0.75) is None  # not published
    assert paper.get("table6/resnet50/ours/oxford_flowers102").dataset == "oxford_flowers102"


def test_unknown_row_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown paper row 'table2/resnet18/moco'.*"
                                         "table2/resnet18/ours"):
        paper.get("table2/resnet18/moco")
