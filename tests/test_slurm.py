"""seaice_nb.slurm on a real single-node SLURM cluster: papermill jobs, dependency chains, failures, DDP env.

The jobs execute a tiny parametrised notebook written into the test's temp dir (the real workflow
notebooks live in nbs/workflows/ and are tested elsewhere): it records its parameters and the SLURM /
rendezvous environment into a JSON file and can be told to fail.
"""

import json, os, subprocess, sys
from pathlib import Path

import nbformat
import pytest

from seaice_nb.slurm import (
    KINDS,
    Resources,
    render,
    submit,
    submit_job,
    submit_chain,
    job_state,
    wait,
    check,
    report,
    JobFailedError,
)

TINY_PARAMS = '''# Parameters of the test notebook
run_dir = "."  # run directory (injected by the job)
seed = 0  # random seed (injected)
slurm_job_id = 0  # $SLURM_JOB_ID (injected)
array_task_id = 0  # array task (preprocess jobs)
array_task_count = 1  # array size
label = "tiny"  # name of the record this run writes
fail = False  # raise an error after writing the record
'''
TINY_BODY = '''import json, os, sys
from pathlib import Path
keys = ["SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
        "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"]
rec = dict(label=label, seed=seed, slurm_job_id=slurm_job_id, array_task_id=array_task_id,
           executable=sys.executable, env={k: os.environ.get(k) for k in keys})
name = f"{label}_{array_task_id}_{os.environ.get('RANK', '0')}.json"
Path(run_dir, name).write_text(json.dumps(rec))
print("wrote", name)
'''
TINY_FAIL = '''if fail:
    raise RuntimeError(f"told to fail ({label})")
'''


@pytest.fixture(scope='module')
def tiny_nb(tmp_path_factory) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    nb.cells = [
        nbformat.v4.new_code_cell(TINY_PARAMS, metadata={'tags': ['parameters']}),
        nbformat.v4.new_code_cell(TINY_BODY),
        nbformat.v4.new_code_cell(TINY_FAIL),
    ]
    path = tmp_path_factory.mktemp('nb') / 'tiny.ipynb'
    nbformat.write(nb, path)
    return path


def records(run_dir: Path, label: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob(f'{label}_*.json'))]


def executed(path: Path):
    assert path.exists(), (
        f"executed notebook {path} missing; run dir holds {sorted(p.name for p in path.parent.iterdir())}"
    )
    return nbformat.read(path, as_version=4)


def test_render_without_cluster(tiny_nb, tmp_path):
    "Rendering is pure: no SLURM needed, nothing left empty appears, the interpreter is this one."
    text = render(
        'evaluate', {'label': 'x', 'n': 3}, Resources(partition='gpu'), tmp_path, seed=5, notebook=tiny_nb
    )
    assert '#SBATCH --partition=gpu' in text and '--account' not in text and '--time' not in text
    assert f"PYTHON={sys.executable}" in text and '-p seed 5' in text and '-r label x -p n 3' in text
    for kind in KINDS:  # every template is valid bash once rendered
        r = subprocess.run(
            ['bash', '-n'],
            input=render(kind, {'a': 'it\'s'}, {'account': 'x y'}, tmp_path, notebook=tiny_nb),
            text=True,
            capture_output=True,
        )
        assert r.returncode == 0, (kind, r.stderr)


@pytest.fixture(scope='module')
def chain(slurm_cluster, tiny_nb, tmp_path_factory):
    "One chain for several tests: preprocess (2-task array) -> train (2 DDP ranks via srun) -> evaluate."
    run = tmp_path_factory.mktemp('chain') / 'run'
    jobs = submit_chain(
        run,
        stages=('preprocess', 'train', 'evaluate'),
        seed=7,
        params={'label': 'stage', 'preprocess': {'label': 'pre'}, 'train': {'label': 'train'}},
        resources={
            'preprocess': {'array': '0-1'},
            'train': {'nodes': 1, 'ntasks_per_node': 2, 'time': '00:05:00'},
        },
        notebooks=dict.fromkeys(('preprocess', 'train', 'evaluate'), tiny_nb),
        env=slurm_cluster.env,
    )
    infos = wait([j.job_id for j in jobs], timeout=150, poll=0.5, env=slurm_cluster.env)
    return run, jobs, infos


def test_chain_runs_papermill_jobs(chain, slurm_cluster):
    "All stages complete in order; each executed notebook carries the injected parameters and its job id."
    run, jobs, infos = chain
    assert [j.kind for j in jobs] == ['preprocess', 'train', 'evaluate']
    assert all(i.state == 'COMPLETED' for i in infos.values()), (
        report(jobs, infos) + '\n' + slurm_cluster.logs(10)
    )
    check(jobs, infos)
    assert infos[jobs[0].job_id].tasks == {'0': 'COMPLETED', '1': 'COMPLETED'}
    for job, label, stems in [
        (jobs[0], 'pre', ['preprocess_0', 'preprocess_1']),
        (jobs[1], 'train', ['train', 'ranks/train.rank1']),
        (jobs[2], 'stage', ['evaluate']),
    ]:
        recs = records(run, label)
        assert len(recs) == len(stems), (label, recs)
        for stem, rec in zip(stems, recs):
            nb = executed(run / f'{stem}.ipynb')
            injected = nb.metadata.papermill.parameters
            assert injected['label'] == label and injected['seed'] == 7 and injected['run_dir'] == str(run)
            # $SLURM_JOB_ID reached the notebook as a parameter and in its environment
            assert injected['slurm_job_id'] == rec['slurm_job_id'] == int(rec['env']['SLURM_JOB_ID'])
            assert any('injected-parameters' in c.metadata.get('tags', []) for c in nb.cells)
            assert Path(rec['executable']).parent.samefile(
                Path(sys.executable).parent
            )  # the project's interpreter
        if job.kind != 'preprocess':
            assert recs[0]['slurm_job_id'] == int(job.job_id)
    assert sorted(r['array_task_id'] for r in records(run, 'pre')) == [0, 1]
    assert (run / 'slurm' / 'train.sbatch').exists() and list((run / 'slurm').glob('seaice-train-*.out'))
    assert len(list((run / 'slurm').glob('seaice-preprocess-*_*.out'))) == 2


def test_ddp_rendezvous_env(chain, slurm_cluster):
    "The train template's 2-task srun step: RANK 0/1, WORLD_SIZE 2, one MASTER_ADDR/PORT, a notebook per rank."
    run, jobs, infos = chain
    assert infos[jobs[1].job_id].ok, report(jobs, infos)
    envs = [r['env'] for r in records(run, 'train')]
    assert sorted((e['RANK'], e['LOCAL_RANK']) for e in envs) == [('0', '0'), ('1', '1')]
    assert {e['WORLD_SIZE'] for e in envs} == {'2'} and {e['LOCAL_WORLD_SIZE'] for e in envs} == {'2'}
    assert {e['NODE_RANK'] for e in envs} == {'0'}
    assert len({(e['MASTER_ADDR'], e['MASTER_PORT']) for e in envs}) == 1
    assert envs[0]['MASTER_ADDR'] == slurm_cluster.node and 20000 <= int(envs[0]['MASTER_PORT']) < 40000
    assert {e['SLURM_JOB_ID'] for e in envs} == {jobs[1].job_id}
    executed(run / 'train.ipynb')
    executed(run / 'ranks' / 'train.rank1.ipynb')


def test_failure_is_reported_and_stops_dependents(slurm_cluster, tiny_nb, tmp_path):
    "A failing notebook fails its job (non-zero exit), keeps its executed notebook, and its dependents never run."
    run = tmp_path / 'run'
    stages = ('train', 'evaluate', 'figures')
    jobs = submit_chain(
        run,
        stages=stages,
        params={'train': {'fail': True, 'label': 'bad'}},
        notebooks=dict.fromkeys(stages, tiny_nb),
        env=slurm_cluster.env,
    )
    infos = wait([j.job_id for j in jobs], timeout=120, poll=0.5, env=slurm_cluster.env)
    train, evaluate, figures = (infos[j.job_id] for j in jobs)
    assert (train.state, train.reason) == ('FAILED', 'NonZeroExitCode') and train.exit_code != 0, train
    assert evaluate.state == figures.state == 'CANCELLED', (evaluate, figures)
    assert evaluate.reason == figures.reason == 'DependencyNeverSatisfied'
    assert job_state(jobs[0].job_id, env=slurm_cluster.env).state == 'FAILED'
    nb = executed(run / 'train.ipynb')  # the failed run's record, with the error in it
    assert nb.metadata.papermill.exception is True
    assert any(
        o.get('ename') == 'RuntimeError' and 'told to fail (bad)' in o.get('evalue', '')
        for c in nb.cells
        for o in c.get('outputs', [])
    )
    assert not (run / 'evaluate.ipynb').exists() and not (run / 'figures.ipynb').exists()
    assert records(run, 'bad') and not records(
        run, 'tiny'
    )  # train wrote its record; evaluate/figures never ran
    with pytest.raises(
        JobFailedError,
        match=rf"train job {jobs[0].job_id} FAILED \(exit {train.exit_code}:0\)"
        rf".*{run / 'train.ipynb'}",
    ):
        check(jobs, infos)
    assert 'never started: dependency failed: train ' + jobs[0].job_id in report(jobs, infos)


def test_cli_submit_wait(slurm_cluster, tiny_nb, tmp_path):
    "`seaice submit KIND ... --wait` prints the job id and final state, and exits 1 when the job failed."
    seaice = Path(sys.executable).parent / 'seaice'
    bad = slurm_cluster.run(
        [
            str(seaice),
            'submit',
            'figures',
            '--notebook',
            str(tiny_nb),
            '--time',
            '00:02:00',
            '--wait',
            '--timeout',
            '60',
            '--run-dir',
            str(tmp_path / 'bad'),
            '-p',
            'fail',
            'true',
            '-p',
            'seed_note',
            '1e-3',
        ]
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    last = bad.stdout.splitlines()[-1]
    assert (
        last.startswith('figures') and 'FAILED' in last and str(tmp_path / 'bad' / 'figures.ipynb') in last
    ), bad.stdout
    nb = executed(tmp_path / 'bad' / 'figures.ipynb')
    assert (
        nb.metadata.papermill.parameters['seed_note'] == 0.001
        and nb.metadata.papermill.parameters['fail'] is True
    )


def test_cli_dry_run_and_errors(tmp_path, capsys):
    "`--dry-run` prints the scripts of a chain; a missing notebook is a one-line user error (exit 1)."
    from seaice_nb.cli import main

    assert (
        main(
            [
                'submit',
                'train',
                '--chain',
                '--dry-run',
                '--gpus',
                '2',
                '--run-dir',
                str(tmp_path),
                '-p',
                'evaluate.split',
                'test',
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count('#!/bin/bash') == 3 and '#SBATCH --gpus-per-node=2' in out and '-r split test' in out
    assert (
        main(['submit', 'figures', '--notebook', str(tmp_path / 'missing.ipynb'), '--run-dir', str(tmp_path)])
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith('seaice: error: notebook') and 'missing.ipynb' in err


# ---------------------------------------------------------------------------------------------------
# preprocessing on the cluster: Dask workers as SLURM jobs, array tasks on all their CPUs


def test_preprocess_on_dask_slurmcluster(slurm_cluster, tmp_path):
    "Scenes preprocessed on a Dask worker that dask_jobqueue.SLURMCluster submitted as a SLURM job (no hand-started scheduler)."
    pytest.importorskip('dask_jobqueue')
    from seaice_nb.data.preprocess import PreprocessConfig, done_scenes, preprocess
    from seaice_nb.slurm import dask_slurm_client
    from seaice_nb.data.synth import generate_scenes

    generate_scenes(tmp_path / 'scenes', 3, seed=1, size=(100, 120), progress=False)
    with slurm_cluster.activated():
        cluster, client = dask_slurm_client(
            1,
            cores=1,
            memory='1GB',
            walltime='00:10:00',
            host='127.0.0.1',
            timeout=120,
            job_extra_directives=[f'--output={tmp_path}/worker-%j.out'],
        )
        try:
            queue = slurm_cluster.run(['squeue', '-h', '-o', '%j %T']).stdout
            pids = client.run(os.getpid)
            s = preprocess(
                tmp_path / 'scenes',
                tmp_path / 's.zarr',
                PreprocessConfig(factor=2, chunk=32),
                client=client,
                progress=False,
            )
        finally:
            client.close()
            cluster.close()
    assert 'dask-worker RUNNING' in queue, queue
    assert pids and os.getpid() not in pids.values()  # the work ran in the SLURM job's worker process
    assert s['failed'] == {} and len(s['written']) == 3 and len(done_scenes(tmp_path / 's.zarr')) == 3


def test_preprocess_array_tasks_use_their_cpus(slurm_cluster, tmp_path):
    "An array job of 2 tasks with 2 CPUs each: each writes its block of scenes with 2 worker processes, sharing the store lock."
    from seaice_nb.data.preprocess import done_scenes, validate_store
    from seaice_nb.data.synth import generate_scenes

    generate_scenes(tmp_path / 'scenes', 4, seed=1, size=(100, 120), progress=False)
    seaice = Path(sys.executable).parent / 'seaice'
    script = f"""#!/bin/bash
#SBATCH --array=0-1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:05:00
#SBATCH --output={tmp_path}/task-%a.log
set -euo pipefail
{seaice} preprocess {tmp_path / 'scenes'} {tmp_path / 's.zarr'} --shard $SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT \\
  --quiet -o factor=2 -o chunk=32 > {tmp_path}/task-$SLURM_ARRAY_TASK_ID.json
"""
    job = submit(script, env=slurm_cluster.env)
    info = wait(job, timeout=180, poll=0.5, env=slurm_cluster.env)[job]
    logs = '\n'.join(p.read_text() for p in tmp_path.glob('task-*.log'))
    assert info.ok and info.tasks == {'0': 'COMPLETED', '1': 'COMPLETED'}, (info, logs)
    outs = [json.loads((tmp_path / f'task-{t}.json').read_text()) for t in (0, 1)]
    assert [o['workers'] for o in outs] == [2, 2], outs  # $SLURM_CPUS_PER_TASK worker processes in each task
    assert sorted(o['written'] for o in outs) == [2, 2] and all(o['failed'] == {} for o in outs)
    assert (
        len(done_scenes(tmp_path / 's.zarr')) == 4
        and validate_store(tmp_path / 's.zarr', check_md5=False) == []
    )
