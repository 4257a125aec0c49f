"""The documentation ships with the project: the README stays a landing page, every link and
design reference resolves inside the repository, and nothing cites a file it does not ship."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_SUFFIXES = ('.py', '.md', '.sh', '.toml', '.cfg', '.txt')
# Folders of the repository's own text (generated runs, caches and environments are not).
SOURCE_DIRS = ('pka_jax', 'configs', 'experiments', 'tests', 'docs', '.ci')


# Markdown reports that runs write (under a run's root), not files of the repository.
RUN_REPORTS = ('table.md', 'summary.md')  # written by the grid runner and the tuner
# Paths of a developer's machine, none of which a user has (spelled in pieces, so that this
# file does not name them itself).
MACHINE_PATHS = re.compile('|'.join(map(re.escape, ('/' + 'work/', '.' + 'library/',
                                                    '../' + 'shared'))))


def repository_files() -> list[str]:
  """Paths, relative to the root, of the repository's text files."""
  found = [name for name in os.listdir(ROOT) if name.endswith(TEXT_SUFFIXES)]
  for top in SOURCE_DIRS:
    for directory, subdirs, files in os.walk(os.path.join(ROOT, top)):
      subdirs[:] = [d for d in subdirs if d != '__pycache__']
      found += [os.path.relpath(os.path.join(directory, f), ROOT) for f in files
                if f.endswith(TEXT_SUFFIXES) or top == '.ci']
  return sorted(found)


def read(path: str) -> str:
  with open(os.path.join(ROOT, path), encoding='utf-8') as f:
    return f.read()


def markdown_files() -> list[str]:
  return [p for p in repository_files() if p.endswith('.md')]


def test_the_readme_is_a_landing_page():
  assert os.path.getsize(os.path.join(ROOT, 'README.md')) <= 12_000


def _anchor(heading: str) -> str:
  """GitHub's anchor of a Markdown heading."""
  text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
  return text.replace(' ', '-')


@pytest.mark.parametrize('page', markdown_files())
def test_every_link_and_figure_resolves(page):
  text = read(page)
  for target in re.findall(r'\]\(([^)\s]+)\)', text):
    if re.match(r'[a-z]+://', target):
      continue
    path, _, anchor = target.partition('#')
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    assert os.path.exists(os.path.join(ROOT, resolved)), f'{page} links {target}'
    if anchor and resolved.endswith('.md'):
      headings = re.findall(r'^#+ (.+)$', read(resolved), flags=re.MULTILINE)
      assert anchor in {_anchor(h) for h in headings}, f'{page} links {target}'


def test_every_design_reference_names_a_section_that_exists():
  sections = set(re.findall(r'^## (§\d+) ', read('docs/design.md'), flags=re.MULTILINE))
  assert {'§1', '§2', '§3'} <= sections
  references = 0
  for path in repository_files():
    for cited in re.findall(r'(§\d+)', read(path)):
      references += 1
      assert cited in sections, f'{path} cites {cited}, which docs/design.md does not have'
  assert references > 10  # the code does cite the design


def test_nothing_cites_a_file_outside_the_repository():
  shipped = set(repository_files())
  for path in sorted(shipped):
    text = read(path)
    assert not MACHINE_PATHS.search(text), path
    # Every Markdown file named is one the repository ships, or a report a run writes.
    for name in re.findall(r'[\w./<>{}-]*\b[\w-]+\.md\b', text):
      if os.path.basename(name) in RUN_REPORTS or re.search(r'^/|[<>{}]|^runs/', name):
        continue
      candidates = {os.path.normpath(name), os.path.normpath(os.path.join(
          os.path.dirname(path), name))}
      basename_shipped = any(p.endswith('/' + name) or p == name for p in shipped)
      assert candidates & shipped or basename_shipped, f'{path} names {name}'


def test_no_document_offers_a_bucket_url_as_a_workdir():
  # A workdir is a directory (a bucket mounted with gcsfuse); a URL is refused (main_test).
  for path in repository_files():
    if not path.startswith('tests/'):
      assert not re.search(r'workdir[= ]+gs://', read(path)), path
  assert 'gcsfuse' in read('docs/scaling.md') and 'gcsfuse' in read('pka_jax/main.py')


@pytest.mark.parametrize('page', markdown_files())
def test_every_path_a_page_names_exists(page):
  for path in re.findall(r'`((?:pka_jax|configs|experiments|tests|docs)/[\w./-]*)`', read(page)):
    assert os.path.exists(os.path.join(ROOT, path)), f'{page} names {path}'


def test_the_readme_layout_table_is_true_to_the_tree():
  layout = read('README.md').split('## Layout', 1)[1].split('\n## ', 1)[0]
  rows = [line for line in layout.splitlines() if line.startswith('| `')]
  assert len(rows) >= 8
  listed = set()
  for row in rows:
    names = re.findall(r'`([\w./-]+)`', row.split(' | ')[0])
    folder = os.path.dirname(names[0]) if '.' in os.path.basename(names[0]) else ''
    for name in names:
      path = name if '/' in name else os.path.join(folder, name)
      assert os.path.exists(os.path.join(ROOT, path)), f'README layout names {path}'
      listed.add(os.path.normpath(path))
  # Every package folder and top-level module of pka_jax has its row.
  package = os.path.join(ROOT, 'pka_jax')
  for name in os.listdir(package):
    if name.startswith('_'):
      continue
    assert os.path.join('pka_jax', name) in listed, f'README layout misses pka_jax/{name}'
