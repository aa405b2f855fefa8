"""big_pretrain: billion-scale vision pretraining (MAE, WSP, FLIP, AIM) in JAX/Flax."""

from setuptools import find_packages, setup


def pinned_requirements(path='requirements.txt'):
  with open(path) as f:
    return [line.strip() for line in f if line.strip() and not line.startswith('#')]


setup(
    name='big_pretrain',
    version='0.1.0',
    description='Vision Transformer pretraining with MAE, WSP, FLIP and AIM on TPU pods and GPUs.',
    packages=find_packages(include=['big_pretrain', 'big_pretrain.*']),
    package_data={'big_pretrain.data.text': ['vocabularies/*.txt']},
    python_requires='>=3.11',
    install_requires=pinned_requirements(),
    # pip install -e .[tf]: TensorFlow, only to prepare TFDS datasets and for the tf.data
    # rows of benchmarks/input_speed.py.
    # .[weights-test]: torch, timm and transformers, which the parity tests load our exported
    # weights in (importing a MAE .pth needs torch alone).
    # .[test]: pytest and pytest-xdist, the suite's runner.
    # .[beam]: Apache Beam and imagehash, to prepare data as a Beam pipeline (--runner) and
    # to leave out near-duplicates of held-out images (--dedup_against).
    extras_require={'tf': pinned_requirements('requirements-tf.txt'),
                    'weights-test': pinned_requirements('requirements-weights-test.txt'),
                    'test': pinned_requirements('requirements-test.txt'),
                    'beam': pinned_requirements('requirements-beam.txt')},
)
