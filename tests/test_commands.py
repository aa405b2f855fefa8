"""The package's commands answer as main.py does: a mistake in one line `<module>: ...` and
its exit code, the traceback only with --verbose (or BIG_PRETRAIN_VERBOSE=1), --help as
argparse prints it."""

import pytest

from big_pretrain import export
from big_pretrain.data import convert
from big_pretrain.data.text import build_vocabulary


def _stopped(main, argv, capsys):
  """(exit code, stderr lines) of a command's main that stops."""
  with pytest.raises(SystemExit) as stopped:
    main(argv)
  return stopped.value.code, capsys.readouterr().err.strip().splitlines()


def test_flag_mistakes_are_one_line_naming_the_flag_and_exit_2(tmp_path, capsys):
  vocabulary = ['labels', '--source=synthetic', f'--output={tmp_path / "v.txt"}']
  cases = [
      (export.main, ['stage', '--format=onnx', '--output=out'],
       "big_pretrain.export: --format='onnx': choose one of timm, hf."),
      (export.main, ['stage', '--format=timm'],
       'big_pretrain.export: the following arguments are required: --output'),
      (convert.main, ['--input=in', '--output=out', '--examples_per_shard=many'],
       "big_pretrain.data.convert: --examples_per_shard='many': give a whole number."),
      (convert.main, ['--input=in', '--output=out', '--shards=3'],
       'big_pretrain.data.convert: unrecognized arguments: --shards=3'),
      (build_vocabulary.main, ['words', *vocabulary[1:]],
       "big_pretrain.data.text.build_vocabulary: command='words': choose one of labels, "
       'tokenizer, captions.'),
      (build_vocabulary.main, [*vocabulary, '--source=folder'],
       "big_pretrain.data.text.build_vocabulary: --source='folder': choose one of"),
      (build_vocabulary.main, ['labels', '--source=image_folder', '--output=v.txt'],
       'big_pretrain.data.text.build_vocabulary: --source=image_folder needs --path: '),
      (build_vocabulary.main, [*vocabulary, '--min_count=0'],
       'big_pretrain.data.text.build_vocabulary: --min_count and --max_size must be positive'),
  ]
  for main, argv, expected in cases:
    code, lines = _stopped(main, argv, capsys)
    assert (code, len(lines)) == (2, 1) and lines[0].startswith(expected), (argv, lines)


def test_an_error_is_one_line_and_verbose_adds_its_traceback(tmp_path, capsys, monkeypatch):
  monkeypatch.delenv('BIG_PRETRAIN_VERBOSE', raising=False)
  argv = ['labels', '--source=image_folder', f'--path={tmp_path / "nowhere"}',
          f'--output={tmp_path / "v.txt"}']
  code, lines = _stopped(build_vocabulary.main, argv, capsys)
  assert code == 2 and len(lines) == 1
  assert lines[0].startswith("big_pretrain.data.text.build_vocabulary: Image folder '")
  for verbose_argv, environment in (([*argv, '--verbose'], None), (argv, '1')):
    if environment:
      monkeypatch.setenv('BIG_PRETRAIN_VERBOSE', environment)
    code, verbose_lines = _stopped(build_vocabulary.main, verbose_argv, capsys)
    assert code == 2 and verbose_lines[0] == 'Traceback (most recent call last):'
    assert verbose_lines[-1] == lines[0]


def test_help_is_argparses(capsys):
  with pytest.raises(SystemExit) as stopped:
    export.main(['--help'])
  printed = capsys.readouterr()
  assert stopped.value.code == 0 and not printed.err
  assert printed.out.startswith('usage: python -m big_pretrain.export [-h] [--verbose]')
  assert '--overwrite' in printed.out
