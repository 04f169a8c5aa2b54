"""The benchmark's config composes with the shapes, cases and rows it promises."""

from tests.composition import compose


def test_config_composes_with_the_issue_shapes_and_rows():
    cfg = compose("benchmark", [])
    assert cfg.task == "benchmark"
    shape = cfg.attention.shapes.deit_small
    assert (shape.batch, shape.heads, shape.tokens, shape.head_dim) == (16, 6, 197, 64)
    lm = cfg.attention.shapes.lm
    assert (lm.batch, lm.heads, lm.tokens, lm.head_dim, lm.causal) == (2, 8, 2048, 64, True)
    assert list(cfg.scaling.tokens) == [256, 512, 1024, 2048, 4096] and cfg.scaling.shape.causal
    cases = {(c.tokens, c.vocab) for c in cfg.output_layer.cases.values()}
    assert {(4096, 50000), (4096, 267744)} <= cases and cfg.output_layer.dim == 512
    rounds = [cfg.repeats, lm.repeats, cfg.scaling.repeats, cfg.output_layer.repeats]
    assert min([*rounds, cfg.models.repeats]) >= 5  # at least 5 interleaved rounds everywhere
    assert {"softmax/sdpa", "softmax/eager", "multimax/authors-eager"} <= set(cfg.attention.rows)
    assert {"multimax/standard", "multimax/fused"} <= set(cfg.output_layer.rows)
