"""Pre-training end to end: the CLI from a train preset, fine-tuning from its run, a SIGKILLed run resumed exactly."""

import json, signal, subprocess, sys, textwrap

import pytest
import torch
import yaml

from seaice_nb import cli
from seaice_nb.testing.fixtures import tiny_store
from seaice_nb.training.runs import read_checkpoint, read_metrics

SMALL = [
    '-o',
    'model_kwargs.dim=32',
    '-o',
    'model_kwargs.temporal_depth=1',
    '-o',
    'model_kwargs.spatial_depth=1',
]


@pytest.fixture(scope='module')
def store():
    return tiny_store(n=3, max_frames=3)


def test_cli_pretrain_then_train_from_it(tmp_path, store, capsys):
    data = ['-o', f'data.store={store}', '-o', 'data.crop=16', '-o', 'model_kwargs.patch_size=4']
    run = tmp_path / 'pre'
    rc = cli.main(
        [
            'pretrain',
            'tsvit_v2',
            *data,
            *SMALL,
            '-o',
            'steps=4',
            '-o',
            'batch_size=2',
            '--quiet',
            '--run-dir',
            str(run),
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out['steps'] == 4 and out['run_dir'] == str(run)
    saved = yaml.safe_load((run / 'config.yaml').read_text())
    assert (
        saved['name'] == 'tsvit_v2_pretrain'
        and saved['data']['min_valid'] == 0.0
        and saved['data']['n_frames'] == 3
    )
    assert read_checkpoint(run / 'checkpoints' / 'last.pt')['meta']['kind'] == 'pretrain'
    assert [r['step'] for r in read_metrics(run) if r['name'] == 'loss'] == [4]
    # fine-tuning reads it through init_from (a run directory) and still starts the heads at the class priors
    rc = cli.main([
        'train', 'tsvit_v2', *data, *SMALL, '-o', 'data.tile=16', '-o', 'epochs=1', '-o', 'steps_per_epoch=1',
        '-o', 'batch_size=2', '-o', f'init_from={run}', '-o', 'head_bias=true', '--quiet', '--run-dir', str(tmp_path / 'ft'),
    ])  # fmt: skip
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['steps'] == 1
    # mistakes: a U-Net cannot be pre-trained this way; a wrong kind of preset; a target the model does not read
    assert cli.main(['pretrain', 'unet_winner', *data[:4], '--dry-run']) == 1
    assert 'not of the TSViT family' in capsys.readouterr().err
    assert cli.main(['pretrain', 'preprocess_10x', '--dry-run']) == 1
    assert "reads a 'pretrain' or 'train' one" in capsys.readouterr().err
    assert cli.main(['pretrain', 'tsvit_v2', *data, '-o', 'targets=[sod]', '--dry-run']) == 1
    assert 'not among the channels' in capsys.readouterr().err
    # the shipped real-scale preset resolves
    assert cli.main(['config', 'tsvit_v2_pretrain']) == 0
    assert yaml.safe_load(capsys.readouterr().out)['kind'] == 'pretrain'


KILL = textwrap.dedent('''
    import os, signal, sys, torch
    from seaice_nb.data.datasets import DataConfig
    from seaice_nb.training.pretrain import PretrainConfig, pretrain
    store, run, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = PretrainConfig(name='k', model='seaice_tsvit_v2',
                         model_kwargs=dict(dim=32, temporal_depth=1, spatial_depth=1, patch_size=4),
                         data=DataConfig(store=store, crop=16, n_frames=3, min_valid=0.0), steps=8, batch_size=2,
                         ckpt_every=2, log_every=2, progress=False)
    step = torch.optim.AdamW.step
    count = [0]
    def dying_step(self, *a, **k):
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-run, after the checkpoint of step 4
        return step(self, *a, **k)
    if kill_at:
        torch.optim.AdamW.step = dying_step
    pretrain(cfg, run)
''')


def test_sigkilled_pretraining_resumes_bit_identical(tmp_path, store):
    run = lambda d, kill: subprocess.run(
        [sys.executable, '-c', KILL, str(store), str(d), str(kill)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    p = run(tmp_path / 'killed', 6)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert read_checkpoint(tmp_path / 'killed' / 'checkpoints' / 'last.pt')['meta']['step'] == 4
    at_kill = read_checkpoint(tmp_path / 'killed' / 'checkpoints' / 'last.pt')['model']
    for d in ('killed', 'straight'):
        p = run(tmp_path / d, 0)
        assert p.returncode == 0, p.stderr[-2000:]
    a = read_checkpoint(tmp_path / 'killed' / 'checkpoints' / 'last.pt')
    b = read_checkpoint(tmp_path / 'straight' / 'checkpoints' / 'last.pt')
    assert a['meta']['step'] == b['meta']['step'] == 8
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in b['model'])
    assert not torch.equal(
        at_kill['patch_embed.weight'], a['model']['patch_embed.weight']
    )  # it did move after the kill
    assert not list((tmp_path / 'killed').rglob('.tmp-*'))
