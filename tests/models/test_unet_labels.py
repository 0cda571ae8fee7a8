"""Class-conditional U-Nets: the class embedding, the null label, the precomputable split, and bad labels."""
import pytest
import torch

from ddpm_fast.models import UNet, UNetConfig

SMALL = dict(image_size=8, in_channels=3, out_channels=3, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
             attn_resolutions=(4,), num_groups=4, dropout=0.1, num_classes=5)


def conditional(**overrides):
    model = UNet(UNetConfig(**{**SMALL, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def inputs(n=4):
    return torch.randn(n, 3, 8, 8), torch.randint(0, 1000, (n,))


def test_class_embedding_shape_and_name():
    model = conditional()
    assert model.null_label == model.config.null_label == 5
    assert tuple(model.state_dict()["class_embedding.weight"].shape) == (6, model.config.temb_dim)
    assert UNet(UNetConfig(**{**SMALL, "num_classes": None})).class_embedding is None
    assert UNetConfig.from_dict(UNetConfig(**SMALL).to_dict()).num_classes == 5


def test_labels_change_the_output_and_none_is_the_null_label(seed):
    model = conditional()
    x, t = inputs()
    with torch.no_grad():
        null = model(x, t, torch.full((4,), 5))
        torch.testing.assert_close(model(x, t), null, rtol=0, atol=0)
        torch.testing.assert_close(model(x, t, 5), null, rtol=0, atol=0)
        y = torch.tensor([0, 1, 2, 4])
        out = model(x, t, y)
        for i in range(4):  # each sample's output depends on its own label only
            torch.testing.assert_close(model(x[i:i + 1], t[i:i + 1], y[i:i + 1]), out[i:i + 1],
                                       rtol=1e-5, atol=1e-5)
            assert not torch.allclose(out[i], null[i], atol=1e-3)
        torch.testing.assert_close(model(x, t, 2), model(x, t, torch.full((4,), 2, dtype=torch.int32)),
                                   rtol=0, atol=0)


def test_precomputed_projections_split_at_the_embedding(seed):
    """time_projections(t, y) = projections(time_embeddings(t) + class_embeddings(y)): what a sampler precomputes
    (the t part per step, the y part per chain) and what forward computes agree."""
    model = conditional()
    x, t = inputs()
    y = torch.tensor([3, 5, 0, 1])
    with torch.no_grad():
        ref = model(x, t, y)
        proj = model.time_projections(t, y)
        torch.testing.assert_close(model(x, None, time_proj=proj), ref, rtol=0, atol=0)
        split = model.projections(model.time_embeddings(t) + model.class_embeddings(y))
        torch.testing.assert_close(split, proj, rtol=0, atol=0)
        # per step: one time row shared by the batch, plus each sample's class row
        t0 = torch.full((4,), int(t[0]))
        shared = model.projections(model.time_embeddings(t0[:1]) + model.class_embeddings(y))
        torch.testing.assert_close(model(x, None, time_proj=shared), model(x, t0, y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.time_projections(t), model.time_projections(t, 5), rtol=0, atol=0)
        # all ResBlocks' projections as one matmul: the same numbers up to rounding
        emb = model.time_embeddings(t) + model.class_embeddings(y)
        weight, bias = model.projection_weights()
        assert weight.shape == (proj.shape[1], model.config.temb_dim) and bias.shape == (proj.shape[1],)
        torch.testing.assert_close(model.projections(emb, (weight, bias)), proj, rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_used_class_rows(seed):
    model = conditional(dropout=0.0).train()
    x, t = inputs()
    model(x, t, torch.tensor([0, 0, 2, 5])).square().mean().backward()
    grad = model.class_embedding.weight.grad
    assert grad[[0, 2, 5]].abs().amin(dim=1).gt(0).all()
    assert torch.equal(grad[[1, 3, 4]], torch.zeros_like(grad[[1, 3, 4]]))


@pytest.mark.parametrize("y, error, match", [
    (torch.tensor([0, 1, 2, 6]), ValueError, r"labels must be in 0..5 \(0..4 the classes, 5 no class\); got "
                                            r"values in \[0, 6\]"),
    (torch.tensor([0, -1, 2, 3]), ValueError, r"got values in \[-1, 3\]"),
    (torch.tensor([0, 1, 2]), ValueError, r"y must be \(N,\) = \(4,\) class labels, got \(3,\)"),
    (torch.zeros(4, 1, dtype=torch.long), ValueError, r"y must be \(N,\) = \(4,\)"),
    (torch.zeros(4), TypeError, "y must hold integer class labels, got torch.float32"),
    (torch.zeros(4, dtype=torch.bool), TypeError, "y must hold integer class labels, got torch.bool"),
    (torch.zeros(4, dtype=torch.long, device="meta"), ValueError, "y is on meta but x is on cpu"),
    (6, ValueError, r"class label 6 is out of range: labels are 0..4, or 5 for no class"),
    (-1, ValueError, "class label -1 is out of range"),
    (True, TypeError, "y must be an int tensor of class labels, an int or None; got bool"),
    ([0, 1, 2, 3], TypeError, "got list"),
])
def test_bad_labels(y, error, match):
    model = conditional()
    with pytest.raises(error, match=match):
        model(*inputs(), y)


def test_labels_for_an_unconditional_unet_and_beside_time_proj():
    x, t = inputs()
    plain = UNet(UNetConfig(**{**SMALL, "num_classes": None}))
    for call in (lambda: plain(x, t, torch.zeros(4, dtype=torch.long)), lambda: plain(x, t, 0),
                 lambda: plain.time_projections(t, 0), lambda: plain.class_embeddings(torch.zeros(4).long())):
        with pytest.raises(ValueError, match=r"unconditional \(UNetConfig.num_classes=None\); it takes no class"):
            call()
    model = conditional()
    with pytest.raises(ValueError, match="pass y to time_projections"):
        model(x, None, 1, time_proj=model.time_projections(t, 1))
    with pytest.raises(ValueError, match=r"labels must be in 0..5"):
        model.class_embeddings(torch.tensor([9]))


@pytest.mark.parametrize("value", [0, -2, True, 2.0, "10"])
def test_bad_num_classes(value):
    with pytest.raises(ValueError, match=f"num_classes={value!r}: must be a positive int"):
        UNetConfig(**{**SMALL, "num_classes": value})


@pytest.mark.gpu
def test_cuda_forward_with_labels_is_graph_capturable(seed):
    """The label range check reads the labels on the host, except during a CUDA graph capture (no sync there):
    a captured forward replays with new labels from the same buffer."""
    model = conditional().cuda()
    x, t = (v.cuda() for v in inputs())
    y = torch.tensor([0, 1, 2, 5], device="cuda")
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(x, t, y)  # warm-up on the side stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x, t, y)
        y.copy_(torch.tensor([4, 3, 5, 0]))
        graph.replay()
        torch.testing.assert_close(out, model(x, t, y), rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="labels must be in 0..5"):
            model(x, t, torch.tensor([0, 1, 2, 6], device="cuda"))
