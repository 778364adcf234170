"""Model zoo checks (issue 6): every preset trains a step on tiny CPU input, paper parameter counts,
padding invariance, known-answer reassembly, missing modalities, timm encoder, transfer learning, benchmark."""

import json
import pytest
import torch

from seaice_nb.core import seed_everything
from seaice_nb.models import create_model, list_models, load_matching, make_batch, set_fused_attn
from seaice_nb.models.losses import MultiTaskLoss, outputs_to_classes
from seaice_nb.models.tsvit import TSViT

torch.set_num_threads(1)  # tiny tensors: threads only add contention on the shared CI/dev cores

TINY_TSVIT = dict(dim=16, temporal_depth=1, spatial_depth=2, num_heads=2)
# preset -> (overrides making it tiny, tile size, frames)
CASES = {
    'tsvit_pastis24': (dict(num_classes=5, img_size=8, **TINY_TSVIT), 8, 3),
    'tsvit_s_pastis24': (dict(num_classes=7, img_size=8, **TINY_TSVIT), 8, 3),
    'seaice_tsvit_v1': (dict(img_size=16, patch_size=4, **TINY_TSVIT), 16, 1),
    'seaice_tsvit_v2': (dict(img_size=16, patch_size=4, **TINY_TSVIT), 16, 3),
    'seaice_tsvit_v3_early': (
        dict(img_size=16, patch_size=4, amsr2_chans=3, era5_chans=2, **TINY_TSVIT),
        16,
        3,
    ),
    'seaice_tsvit_v3_xattn': (
        dict(img_size=16, patch_size=4, amsr2_chans=3, era5_chans=2, optical_chans=2, **TINY_TSVIT),
        16,
        3,
    ),
    'seaice_tsvit_v3_pixel': (dict(in_chans=6, img_size=16, patch_size=4, refine=8, **TINY_TSVIT), 16, 3),
    'unet_baseline': (dict(filters=(4, 6, 8, 8)), 16, 1),
    'unet_winner': (dict(filters=(4, 4, 8, 8)), 16, 1),
    'unet_4level': (dict(filters=(4, 6, 6, 6)), 16, 1),
    'unet_6level': (dict(filters=(4,) + (6,) * 5), 64, 1),
    'unet_8level': (dict(filters=(2,) + (4,) * 7), 256, 1),
    'unet_timm': (dict(encoder='resnet10t'), 32, 1),
}


def _build(name, seed=0):
    kw, size, frames = CASES[name]
    seed_everything(seed)
    m = create_model(name, **kw)
    b = make_batch(m, 2, frames, size, seed=seed)
    for t, n in m.tasks.items() if hasattr(m, 'tasks') else ():
        if t not in b:
            b[t] = torch.randint(0, n, (2, size, size))
    return m, b


def _outputs_ok(m, out, size):
    want = (
        dict(m.tasks) if hasattr(m, 'tasks') else {'sic': 1 if m.sic_regression else 11, 'sod': 6, 'floe': 7}
    )
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, n, size, size) for k, n in want.items()}
    assert all(bool(v.isfinite().all()) for v in out.values())


def test_every_preset_is_covered():
    assert sorted(CASES) == list_models()


@pytest.mark.parametrize('name', sorted(CASES))
def test_preset_forward_backward(name):
    m, b = _build(name)
    m.train()
    out = m(**{k: b[k] for k in m.input_keys})
    _outputs_ok(m, out, CASES[name][1])
    loss, parts = MultiTaskLoss({t: 1.0 for t in out})(out, b)
    assert torch.isfinite(loss)
    loss.backward()
    if hasattr(
        m, 'modality_dropout'
    ):  # a dropped modality leaves its projection without gradient: add an eval pass
        m.eval()
        l2, _ = MultiTaskLoss({t: 1.0 for t in out})(m(**{k: b[k] for k in m.input_keys}), b)
        l2.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not bool(p.grad.isfinite().all())]
    assert not no_grad, f"parameters without a (finite) gradient: {no_grad}"
    maps = outputs_to_classes(out)
    assert all(v.shape == (2, CASES[name][1], CASES[name][1]) for v in maps.values())


@pytest.mark.parametrize('name', ['seaice_tsvit_v2', 'unet_winner'])
def test_deterministic_under_seed(name):
    outs = []
    for _ in range(2):
        m, b = _build(name, seed=3)
        m.eval()
        outs.append(m(**{k: b[k] for k in m.input_keys}))
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k])


def test_paper_parameter_counts():
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(create_model('tsvit_pastis24')) == 1_657_476
    assert n(create_model('tsvit_s_pastis24')) == 435_524


def test_padding_frames_never_change_the_output():
    torch.manual_seed(0)
    m = TSViT(
        {'out': 5},
        in_chans=3,
        img_size=8,
        patch_size=2,
        dim=16,
        temporal_depth=2,
        spatial_depth=1,
        num_heads=2,
        date_encoding='both',
        valid_channel=True,
    ).eval()
    b = make_batch(m, 2, 2, 8)
    ref = m(**{k: b[k] for k in m.input_keys})['out']
    B, T, C, H, W = b['image'].shape
    for n, where in ((1, 'front'), (5, 'back')):
        pad = {
            'image': torch.randn(B, n, C, H, W) * 50,
            'valid': torch.ones(B, n, H, W, dtype=torch.bool),
            'frame_mask': torch.zeros(B, n, dtype=torch.bool),
            'doy': torch.randint(0, 367, (B, n)),
            'days_before': torch.randint(0, 500, (B, n)),
        }
        cat = (
            (lambda k: torch.cat([pad[k], b[k]], 1))
            if where == 'front'
            else (lambda k: torch.cat([b[k], pad[k]], 1))
        )
        for fused in (True, False):
            set_fused_attn(m, fused)
            out = m(**{k: cat(k) for k in m.input_keys})['out']
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # without the mask the padding would matter: the test can fail
    out = m(
        image=torch.cat([pad['image'], b['image']], 1),
        doy=torch.cat([pad['doy'], b['doy']], 1),
        days_before=torch.cat([pad['days_before'], b['days_before']], 1),
    )['out']
    assert (out - ref).abs().max() > 5e-5  # 10x the tolerance the masked model meets


def test_rearrange_known_answer_in_the_model():
    """Zero every weight, set the head bias to 0..p²-1: pixel (y, x) must read (y % p) * p + x % p in every class."""
    m = TSViT(
        {'out': 3},
        in_chans=2,
        img_size=12,
        patch_size=3,
        dim=8,
        temporal_depth=1,
        spatial_depth=1,
        num_heads=2,
    )
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.head.bias.copy_(torch.arange(9.0))
    out = m(torch.randn(2, 2, 2, 12, 6), doy=torch.tensor([[1, 2], [3, 4]]))['out']
    y, x = torch.meshgrid(torch.arange(12), torch.arange(6), indexing='ij')
    assert torch.equal(out, ((y % 3) * 3 + x % 3).float().expand(2, 3, 12, 6))


@pytest.mark.parametrize('name', ['seaice_tsvit_v3_early', 'seaice_tsvit_v3_xattn'])
def test_missing_modality_gives_valid_output(name):
    m, b = _build(name)
    m.eval()
    full = m(**{k: b[k] for k in m.input_keys})
    for missing in (['amsr2'], ['era5'], ['amsr2', 'era5', 'optical']):
        kw = {k: b[k] for k in m.input_keys if k not in missing}  # key absent
        out = m(**kw)
        _outputs_ok(m, out, CASES[name][1])
        out_none = m(**{**kw, **{k: None for k in missing}})  # key present but None
        for k in out:
            torch.testing.assert_close(out[k], out_none[k])
        assert any(not torch.allclose(out[k], full[k]) for k in out)


def test_timm_encoder_and_transfer_learning(tmp_path):
    m4 = create_model('unet_4level', in_chans=3)
    path = tmp_path / 'ckpt.pt'
    torch.save({'model': m4.state_dict(), 'epoch': 3}, path)
    m6 = create_model('unet_6level', in_chans=3)
    rep = load_matching(m6, path)
    assert 'input_block.0.weight' in rep['loaded'] and torch.equal(
        m6.input_block[0].weight, m4.input_block[0].weight
    )
    assert any(s.startswith('up.3.conv.0.weight') for s in rep['skipped'])
    assert 'down.4.0.weight' in rep['missing'] and rep['unexpected'] == []
    mt = create_model('unet_timm', encoder='resnet10t', in_chans=3, pretrained=False)
    out = mt(torch.randn(2, 1, 3, 32, 32))
    assert out['sod'].shape == (2, 6, 32, 32)


def test_bench_runs_tiny(capsys):
    from seaice_nb.cli import main

    assert (
        main(
            [
                'bench',
                'model',
                '--presets',
                'unet_4level',
                'seaice_tsvit_v2',
                '--batch-size',
                '2',
                '--size',
                '16',
                '--frames',
                '2',
                '--steps',
                '1',
                '--warmup',
                '0',
                '--attn-size',
                '8',
                '--attn-frames',
                '2',
                '--matmul-n',
                '128',
                '--threads',
                '1',
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert set(res['presets']) == {'unet_4level', 'seaice_tsvit_v2'}
    assert res['attention']['fused_over_unfused'] > 0 and res['matmul_gflops'] > 0
    assert main(['bench', 'model', '--presets', 'nope']) == 1


def test_official_tsvit_parity_and_comparison():
    "Issue 26: the attributed copy of the official TSViT has our PASTIS24 parameter count; a tiny A/B run."
    from seaice_nb.bench.model import OfficialTSViT, compare_official, official_config, official_input

    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(OfficialTSViT(official_config())) == n(create_model('tsvit_pastis24')) == 1_657_476
    tiny = dict(img_size=8, dim=16, temporal_depth=1, spatial_depth=2, num_heads=2)
    off = OfficialTSViT(official_config(num_classes=5, **tiny))
    assert n(off) == n(create_model('tsvit_pastis24', num_classes=5, **tiny))
    doy = torch.tensor([[1, 200, 366]])
    assert off(official_input(torch.randn(1, 3, 10, 8, 8), doy)).shape == (1, 5, 8, 8)
    res = compare_official(batch_size=1, frames=3, repeats=2, warmup=0, **tiny)
    assert res['params_ours'] == res['params_official'] and res['repeats'] == 2
    assert res['ratio_min'] <= res['ratio_median'] <= res['ratio_max'] and isinstance(res['goals_met'], bool)


def test_bench_official_only_cli(capsys):
    "`seaice bench model --official-only` prints the comparison alone (PASTIS24 sizes, 3 frames: fast)."
    from seaice_nb.cli import main

    args = ['--official-frames', '3', '--official-batch-size', '1', '--official-repeats', '1']
    assert main(['bench', 'model', '--official-only', *args, '--matmul-n', '64', '--threads', '1']) == 0
    res = json.loads(capsys.readouterr().out)
    assert res['presets'] == {} and 'attention' not in res
    assert res['official']['params_ours'] == res['official']['params_official'] == 1_657_476
    assert res['official']['frames'] == 3 and res['official']['goal'] == 1.3
