"""The documentation site (mkdocs.yml, docs/) builds with --strict: a broken link or anchor, or
a page left out of the navigation, fails the build and so the tests."""

import pathlib
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.docs

ROOT = pathlib.Path(__file__).parents[1]


def _build(project: pathlib.Path, site: pathlib.Path) -> subprocess.CompletedProcess:
  # Not --quiet: mkdocs counts the warnings that --strict aborts on through its log, which
  # --quiet silences.
  return subprocess.run(
      [sys.executable, '-m', 'mkdocs', 'build', '--strict',
       '--config-file', str(project / 'mkdocs.yml'), '--site-dir', str(site)],
      capture_output=True, text=True, timeout=300, check=False,
      env={'PATH': '/usr/bin:/bin', 'NO_MKDOCS_2_WARNING': '1'})


def test_the_site_builds_strictly_with_every_page_in_its_navigation(tmp_path):
  built = _build(ROOT, tmp_path / 'site')
  assert built.returncode == 0, built.stdout + built.stderr
  for page in ('index.html', 'methods/index.html', 'architecture/index.html'):
    assert (tmp_path / 'site' / page).is_file(), page
  architecture = (tmp_path / 'site' / 'architecture' / 'index.html').read_text(encoding='utf-8')
  assert 'Import order' in architecture and 'errors &lt; registry &lt;' in architecture


def _copy_of_the_project(tmp_path) -> pathlib.Path:
  project = tmp_path / 'project'
  shutil.copytree(ROOT / 'docs', project / 'docs')
  shutil.copy(ROOT / 'mkdocs.yml', project / 'mkdocs.yml')
  return project


def test_a_broken_link_fails_the_build(tmp_path):
  project = _copy_of_the_project(tmp_path)
  with open(project / 'docs' / 'index.md', 'a', encoding='utf-8') as index:
    index.write('\nSee [a page that is not there](no_such_page.md).\n')
  built = _build(project, tmp_path / 'site')
  assert built.returncode != 0 and 'no_such_page.md' in built.stdout + built.stderr


def test_a_page_left_out_of_the_navigation_fails_the_build(tmp_path):
  project = _copy_of_the_project(tmp_path)
  (project / 'docs' / 'orphan.md').write_text('# A page no one links\n', encoding='utf-8')
  built = _build(project, tmp_path / 'site')
  assert built.returncode != 0 and 'orphan.md' in built.stdout + built.stderr
