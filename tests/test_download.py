"""Integration tests of `seaice download` over real HTTP on 127.0.0.1 (seaice_nb.testing.figshare_server):
every fault at once, bot challenges and URL-form fallback, 416, a killed and an interrupted process, the
benchmark on tiny sizes, and the committed scene manifest."""

import collections, io, json, os, shutil, signal, subprocess, sys, time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from seaice_nb.core import DownloadError, file_digest
from seaice_nb.bench.download import main as bench_main
from seaice_nb.data.download import (
    Downloader,
    Retry,
    check_name,
    kill_and_resume,
    list_files,
    main,
    read_scene_manifest,
    seaice_command,
    verify,
    write_scene_manifest,
)
from seaice_nb.testing.figshare_server import FakeFile, FigshareServer, make_files
from conftest import require

pytestmark = pytest.mark.timeout(60)
FAST = ['--backoff', '0.01', '--timeout', '2', '--quiet']


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob('*'))


def assert_verified(dest: Path, files):
    for f in files:
        assert verify(dest / f.name, len(f.data), f.md5) is None, f.name


def test_every_fault_at_once(tmp_path, capsys):
    good = make_files(
        [400_000, 300_000, 200_000, 150_000, 120_000, 100_000, 90_000, 80_000, 50_000, 0], seed=11
    )
    reset, e500, e429, challenge, corrupt, norange, slow, stall, cut, empty = good
    reset.faults += ['reset:0.5', 'reset:0.8']
    e500.faults += ['500', '503', '500']
    e429.faults += ['429:1']
    challenge.faults += ['202']
    corrupt.faults += ['corrupt']
    norange.ignore_range = True
    norange.faults += ['cut:0.6', '500']
    slow.rate = 400_000
    stall.faults += ['stall:3']  # longer than the client's 2 s read timeout
    cut.faults += ['cut:0.3', 'cut:0.3']  # resumes twice
    bad_names = [
        '../escape.nc',
        '/etc/passwd',
        '.hidden.nc',
        'nul\0.nc',
        'sub/dir.nc',
        '..',
        'spaced name.nc',
    ]
    evil = [FakeFile(90000 + i, n, b'evil') for i, n in enumerate(bad_names)]
    root = tmp_path / 'root'
    dest = root / 'dest'
    with FigshareServer({5: good + evil}) as srv:
        t0 = time.monotonic()
        rc = main(['--article', '5', '--api', srv.api, '--out', str(dest), '--workers', '4'] + FAST)
        took = time.monotonic() - t0
        out = capsys.readouterr().out
        assert rc == 0  # every downloadable file verified; the malicious names are refused
        assert_verified(dest, good)
        assert tree(root) == ['dest'] + sorted(f'dest/{f.name}' for f in good)  # nothing else, nowhere else
        assert (
            f'downloaded {len(good)}, skipped 0 (already verified), failed 0, refused {len(evil)} (unsafe listing entries)'
            in out
        )
        for n in bad_names:
            assert f'WARNING refused {n!r}: unsafe file name {n!r}' in out
        assert '1 bot challenge(s) met' in out
        assert 'path traversal' in out and 'absolute path' in out and 'hidden name' in out and 'NUL' in out
        assert 'md5 mismatch: re-fetched' in out and 'server ignored Range: restarted' in out
        # Retry-After honoured: the retry of the 429 file came at least 1 s after the 429
        times = [
            t
            for m, p, h, t in srv.requests
            if p.startswith(f'/objects/{e429.id}') or p == f'/v2/file/download/{e429.id}'
        ]
        assert len(times) == 2 and times[1] - times[0] >= 1.0
        # resumes re-fetched nothing twice where the client kept every byte (clean cuts)
        assert srv.served[cut.name] == len(cut.data)
        assert took < 30
        # a rerun skips every verified file and fetches nothing
        srv.reset_counts()
        assert main(['--article', '5', '--api', srv.api, '--out', str(dest), '--only', '2*'] + FAST) == 0
        assert srv.served == {}
        assert f'skipped {len(good)} (already verified)' in capsys.readouterr().out


def test_url_form_fallback_and_challenge(tmp_path):
    files = make_files([30_000, 20_000], seed=12)
    with FigshareServer({5: files}, challenge_forms={'ndownloader'}) as srv:  # figshare's bot challenge
        rep = Downloader(tmp_path / 'a', retry=Retry(backoff=0.01), progress=False).run(
            list_files(5, srv.api)
        )
        assert rep.ok
        assert_verified(tmp_path / 'a', files)
        srv.challenge_forms = {'ndownloader', 'api'}  # every form challenged
        rep = Downloader(tmp_path / 'b', retry=Retry(backoff=0.01), progress=False).run(
            list_files(5, srv.api)
        )
        assert [o.status for o in rep.files] == ['failed', 'failed']
        assert all('every URL form failed' in o.reason and 'bot challenge' in o.reason for o in rep.files)
        assert tree(tmp_path / 'b') == []  # no empty file left behind


def download_requests(srv, f) -> list[str]:
    "The URL form of every download request for `f`, in order ('ndownloader' or 'api'; redirects not counted)."
    return [
        'ndownloader' if p.startswith('/ndownloader/') else 'api'
        for m, p, h, t in srv.requests
        if p in (f'/ndownloader/files/{f.id}', f'/v2/file/download/{f.id}')
    ]


def test_one_time_challenge_retried_on_the_same_url(tmp_path):
    "Issue 14: one 202 used to fail the file when the other URL form answered 404; now it is waited out on the same URL."
    files = make_files([30_000, 20_000], seed=21)
    files[0].faults += ['202:1']  # with Retry-After: 1
    with FigshareServer({5: files}, missing_forms={'api'}) as srv:
        rep = Downloader(tmp_path, retry=Retry(backoff=0.01, seed=0), progress=False).run(
            list_files(5, srv.api)
        )
        assert rep.ok and [o.status for o in rep.files] == ['downloaded', 'downloaded']
        assert_verified(tmp_path, files)
        assert download_requests(srv, files[0]) == [
            'ndownloader',
            'ndownloader',
        ]  # same URL, never the 404 form
        t = [t for m, p, h, t in srv.requests if p == f'/ndownloader/files/{files[0].id}']
        assert t[1] - t[0] >= 1.0  # Retry-After honoured
        assert (
            rep.challenges == 1
            and rep.files[0].challenges == 1
            and '1 bot challenge(s) waited out' in rep.files[0].reason
        )
        assert '1 bot challenge(s) met (HTTP 202 / empty body)' in rep.summary()


def test_repeated_challenge_then_next_form_then_given_up(tmp_path):
    files = make_files([10_000, 10_000], seed=22)
    files[0].faults += ['202', '202', '202']  # three challenges, then the file
    files[1].faults += ['202'] * 10  # never clears
    with FigshareServer({5: files}, missing_forms={'api'}) as srv:
        rep = Downloader(tmp_path, retry=Retry(backoff=0.01, challenges=4, seed=0), progress=False).run(
            list_files(5, srv.api)
        )
        st = {o.name: o for o in rep.files}
        assert st[files[0].name].status == 'downloaded' and st[files[0].name].challenges == 3
        assert download_requests(srv, files[0]) == ['ndownloader'] * 4
        assert st[files[1].name].status == 'failed' and st[files[1].name].challenges == 4
        assert download_requests(srv, files[1]) == ['ndownloader'] * 4 + [
            'api'
        ]  # bounded, then the next form
        assert (
            'bot challenge), 4 times' in st[files[1].name].reason and 'HTTP 404' in st[files[1].name].reason
        )
        assert rep.challenges == 7 and not rep.ok
    assert tree(tmp_path) == [files[0].name]  # no empty or partial file under a final name


def test_rerun_with_a_traversal_entry_exits_0_with_a_warning(tmp_path, capsys):
    "Issue 14: an entry refused as unsafe must not make every rerun fail once the downloadable files are verified."
    files = make_files([5_000, 6_000], seed=23) + [FakeFile(99001, '../../outside.nc', b'evil')]
    root = tmp_path / 'root'
    dest = root / 'dest'
    with FigshareServer({5: files}) as srv:
        args = ['--article', '5', '--api', srv.api, '--out', str(dest)] + FAST
        assert main(args) == 0
        out = capsys.readouterr().out
        assert (
            'downloaded 2, skipped 0 (already verified), failed 0, refused 1 (unsafe listing entries)' in out
        )
        assert (
            "WARNING refused '../../outside.nc': unsafe file name '../../outside.nc'" in out
            and 'path traversal' in out
        )
        srv.reset_counts()
        assert main(args) == 0  # the rerun: everything verified, the warning again
        out = capsys.readouterr().out
        assert (
            'downloaded 0, skipped 2 (already verified), failed 0, refused 1' in out
            and 'WARNING refused' in out
        )
        assert srv.served == {}
        files[1].faults += ['403'] * 2
        (dest / files[1].name).unlink()
        assert main(args) == 1  # a real failure still exits 1
    assert tree(root) == ['dest', f'dest/{files[0].name}']


def test_empty_200_403_and_gave_up(tmp_path):
    files = make_files([10_000, 10_000, 10_000], seed=13)
    files[0].faults += ['empty']  # 200 with no body on the first form: fall back
    files[1].faults += ['403']
    files[2].faults += ['500'] * 20  # never recovers within the retry budget
    with FigshareServer({5: files}) as srv:
        rep = Downloader(tmp_path, retry=Retry(attempts=4, backoff=0.01), progress=False).run(
            list_files(5, srv.api)
        )
    st = {o.name: o for o in rep.files}
    assert st[files[0].name].status == st[files[1].name].status == 'downloaded'
    assert (
        st[files[2].name].status == 'failed' and 'gave up after 4 failed attempts' in st[files[2].name].reason
    )
    assert not (tmp_path / files[2].name).exists()


def test_416_complete_part_and_oversized_part(tmp_path):
    files = make_files([50_000, 40_000], seed=14)
    a, b = files
    (tmp_path / f'.{a.name}.part').write_bytes(a.data)  # complete part: 416, then verify
    (tmp_path / f'.{b.name}.part').write_bytes(b.data + b'junk')  # longer than the file: restart
    with FigshareServer({5: files}) as srv:
        rep = Downloader(tmp_path, retry=Retry(backoff=0.01), progress=False).run(list_files(5, srv.api))
        assert rep.ok and srv.served.get(a.name, 0) == 0 and srv.served[b.name] == len(b.data)
    assert_verified(tmp_path, files)
    assert tree(tmp_path) == sorted(f.name for f in files)


def test_stale_part_and_wrong_final(tmp_path):
    a, b = make_files([60_000, 30_000], seed=15)
    (tmp_path / f'.{a.name}.part').write_bytes(b'x' * 20_000)  # no sidecar: resumed, md5 fails, refetched
    (tmp_path / b.name).write_bytes(b'truncated')  # wrong final file: replaced
    with FigshareServer({5: [a, b]}) as srv:
        rep = Downloader(tmp_path, retry=Retry(backoff=0.01), progress=False).run(list_files(5, srv.api))
    assert rep.ok
    assert_verified(tmp_path, [a, b])


def test_always_corrupt_fails_cleanly(tmp_path):
    f = make_files([20_000], seed=16)[0]
    f.faults += ['corrupt'] * 5
    with FigshareServer({5: [f]}) as srv:
        rep = Downloader(tmp_path, retry=Retry(backoff=0.01), progress=False).run(list_files(5, srv.api))
    assert rep.files[0].status == 'failed' and 'md5 mismatch 3 times' in rep.files[0].reason
    assert tree(tmp_path) == []


def test_disk_space_checked_up_front(tmp_path, monkeypatch):
    f = make_files([5000], seed=17)[0]
    with FigshareServer({5: [f]}) as srv:
        monkeypatch.setattr(
            shutil, 'disk_usage', lambda p: collections.namedtuple('u', 'total used free')(10, 10, 100)
        )
        with pytest.raises(DownloadError, match='100 B free but 4.9 KiB are still to download'):
            Downloader(tmp_path, progress=False).run(list_files(5, srv.api))
        assert srv.served == {}


def test_manifest_record_then_verify_offline(tmp_path):
    files = make_files([1000, 2000], seed=18)
    m = tmp_path / 'files.json'
    with FigshareServer({5: files}) as srv:
        assert main(['--article', '5', '--api', srv.api, '--manifest-only', '--manifest', str(m)]) == 0
        assert main(['--article', '5', '--manifest', str(m), '--out', str(tmp_path / 'd')] + FAST) == 0
    doc = json.loads(m.read_text())
    assert doc['format'] == 'seaice_nb.file_manifest/1' and doc['article_id'] == 5
    assert [(x['name'], x['size'], x['md5']) for x in doc['files']] == [
        (f.name, len(f.data), f.md5) for f in files
    ]
    # the server is gone: verification uses the manifest alone
    assert main(['--manifest', str(m), '--out', str(tmp_path / 'd'), '--verify']) == 0
    (tmp_path / 'd' / files[1].name).write_bytes(b'x' * 2000)
    assert main(['--manifest', str(m), '--out', str(tmp_path / 'd'), '--verify']) == 1


def test_kill_midway_then_resume(tmp_path):
    f = make_files([3_000_000], seed=19, pattern='kill{i}.nc')[0]
    f.rate = 1_000_000  # 3 s at full length; killed after about 1 s
    with FigshareServer({5: [f]}) as srv:
        k = kill_and_resume(srv, 5, f, tmp_path, kill_after=0.8)
    assert k['rerun_exit'] == 0, k['rerun_output']
    assert not k['final_existed_at_kill']
    assert 0 < k['part_bytes_at_kill'] < k['size']
    assert k['refetched'] == k['missing']  # resumed: exactly the missing bytes, not the whole file
    assert k['served_before_kill'] - k['part_bytes_at_kill'] < 1_000_000  # at most what sat in socket buffers
    assert_verified(tmp_path, [f])
    assert tree(tmp_path) == [f.name]


def test_ctrl_c_keeps_finished_work(tmp_path):
    done = make_files([20_000], seed=20, pattern='done{i}.nc')[0]
    slow = make_files([2_000_000], seed=21, pattern='slow{i}.nc', first_id=50000001)[0]
    slow.rate = 500_000
    with FigshareServer({5: [done, slow]}) as srv:
        cmd = (
            seaice_command()
            + ['download', '--article', '5', '--api', srv.api, '--out', str(tmp_path), '--workers', '2']
            + FAST
        )
        # Ctrl-C as a terminal sends it: a suite started in the background (`make test &`) hands its children
        # SIGINT ignored, and Python then never raises KeyboardInterrupt, so the child gets the default back
        p = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        part = tmp_path / f'.{slow.name}.part'
        t0 = time.monotonic()
        while not (part.is_file() and part.stat().st_size > 200_000) and time.monotonic() - t0 < 60:
            if p.poll() is not None:
                break
            time.sleep(0.02)
        started = part.is_file() and part.stat().st_size > 200_000
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=20)
        assert started, f"the slow file never reached 200 kB before the command ended or 60 s passed: {out}"
        assert p.returncode == 130, out
        assert 'interrupted' in out
        assert_verified(tmp_path, [done])
        assert not (tmp_path / slow.name).exists() and part.stat().st_size > 0
        slow.rate = None
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
    assert_verified(tmp_path, [done, slow])


def test_bench_runs_on_tiny_sizes(tmp_path):
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = bench_main(
            [
                '--files',
                '2',
                '--size-mb',
                '0.25',
                '--resume-mb',
                '1',
                '--rate-mb',
                '1',
                '--repeat',
                '1',
                '--dir',
                str(tmp_path),
            ]
        )
    out = json.loads(buf.getvalue())
    assert rc == 0
    assert {
        'plain_MiBps',
        'workers1_MiBps',
        'workers4_MiBps',
        'workers1_ratio',
        'workers4_ratio',
    } <= out.keys()
    assert (
        out['workers4_MiBps'] > 0
        and out['resume']['refetched'] == out['resume']['missing'] < out['resume']['size']
    )


def test_committed_scene_manifest(repo, tmp_path):
    rows = read_scene_manifest(repo / 'data_manifest' / 'scenes.csv')
    c = collections.Counter((r['split'], r['ice_service']) for r in rows)
    assert c == {('train', 'dmi'): 315, ('train', 'cis'): 197, ('test', 'cis'): 12, ('test', 'dmi'): 8}
    assert collections.Counter(r['date'][:4] for r in rows if r['split'] == 'train') == {
        '2018': 88,
        '2019': 128,
        '2020': 117,
        '2021': 179,
    }
    assert len({r['rtt_name'] for r in rows}) == len(rows)
    for r in rows:
        check_name(r['rtt_name'])
    # the committed official lists are the ones the manifest was made from, byte for byte
    lists = repo / 'data_manifest'
    write_scene_manifest(lists / 'dataset.json', lists / 'testset.json', tmp_path)
    assert (tmp_path / 'scenes.csv').read_text() == (lists / 'scenes.csv').read_text()
    assert (tmp_path / 'scenes.meta.json').read_text() == (lists / 'scenes.meta.json').read_text()
    meta = json.loads((lists / 'scenes.meta.json').read_text())['sources']
    assert {k: file_digest(lists / v['file']) for k, v in meta.items()} == {
        'train': '0f4acc412b083250c2bc21ab7ac5b376',  # the lists of the AI4Arctic challenge repository
        'test': '7d105b23f7853352ee5c6fcde0805005',
    }
