
import pytest

from post_fl.core.data import DataError, TextDataset, partition, read_text_file, write_text_file


def test_csv_tsv_jsonl_read_the_same(tmp_path, sentiment):
    csv_p = write_text_file(sentiment, tmp_path / "d.csv")
    jsonl_p = write_text_file(sentiment, tmp_path / "d.jsonl")
    tsv_p = tmp_path / "d.tsv"
    tsv_p.write_text("label\tsentence\n" + "".join(
        f"{sentiment.label_names[y]}\t{t}\n" for t, y in zip(sentiment.texts, sentiment.labels)))
    a = read_text_file(csv_p, label_names=sentiment.label_names)
    b = read_text_file(jsonl_p, label_names=sentiment.label_names)
    c = read_text_file(tsv_p, text_column="sentence", label_names=sentiment.label_names)
    assert a == b == c == sentiment


def test_joined_text_columns_and_inferred_numeric_labels(tmp_path):
    p = tmp_path / "ag.csv"
    p.write_text('label,title,description\n2,"Win","Team wins"\n10,"Fed","Rates up"\n1,"UN","Talks"\n')
    d = read_text_file(p, text_column="title+description")
    assert d.texts[0] == "Win Team wins"
    assert d.label_names == ["1", "2", "10"]  # numeric order, not string order
    assert d.labels == [1, 2, 0]


@pytest.mark.parametrize("content,suffix,message", [
    ("text,label\n", ".csv", "empty"),
    ("", ".csv", "empty"),
    ("words,label\nhi,positive\n", ".csv", "missing column 'text'"),
    ("text,label\nhi,neutral\n", ".csv", r"row 1: unknown label 'neutral'"),
    ("text,label\n,positive\n", ".csv", "row 1: empty 'text'"),
    ('{"text": "a", "label": "positive"}\nnot json\n', ".jsonl", "line 2 is not valid JSON"),
    ("a", ".xlsx", "unsupported file type"),
])
def test_bad_files_name_the_problem(tmp_path, content, suffix, message):
    p = tmp_path / f"bad{suffix}"
    p.write_text(content)
    with pytest.raises(DataError, match=message) as exc:
        read_text_file(p, label_names=["negative", "positive"])
    assert str(p) in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_text_file(tmp_path / "none.csv")


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_partitions_cover_the_data_once(sentiment, scheme):
    parts = partition(sentiment, 4, scheme=scheme, alpha=0.3, seed=0)
    assert len(parts) == 4
    seen = sorted(t for p in parts for t in p.texts)
    assert seen == sorted(sentiment.texts)
    if scheme == "pathological":
        assert all(len(set(p.labels)) <= 1 for p in parts)


def test_partition_bad_arguments(sentiment):
    with pytest.raises(DataError, match="unknown"):
        partition(sentiment, 2, scheme="zipf")
    with pytest.raises(DataError, match="cannot split"):
        partition(sentiment, 1000)


def test_dataset_rejects_out_of_range_label():
    with pytest.raises(DataError, match="label index 2"):
        TextDataset(["a"], [2], ["x", "y"])


def test_dirichlet_gives_every_client_at_least_the_minimum():
    from conftest import make_sentiment

    data = make_sentiment(400, seed=3)
    for minimum in (1, 3):
        parts = partition(data, 100, scheme="dirichlet", alpha=0.3, seed=0, min_partition_size=minimum)
        assert min(len(p) for p in parts) >= minimum
        assert sorted(t for p in parts for t in p.texts) == sorted(data.texts)
    # without the top-up this draw leaves clients empty (the README's 100 clients, alpha 0.3)
    from post_fl.core import data as D

    raw = D.top_up_partitions([[1, 2, 3], [], [4]], 1, seed=0)
    assert [len(p) for p in raw] == [2, 1, 1]


def test_impossible_minimum_partition_sizes_are_refused_up_front(sentiment):
    with pytest.raises(DataError, match="cannot split 64 examples among 20 clients with at least 4"):
        partition(sentiment, 20, scheme="dirichlet", min_partition_size=4)
    skewed = TextDataset([f"t{i}" for i in range(64)], [0] * 60 + [1] * 4, ["negative", "positive"])
    with pytest.raises(DataError, match="pathological partitioning gives client"):  # 4 positives for 2 clients
        partition(skewed, 4, scheme="pathological", classes_per_partition=1, min_partition_size=3)


def test_every_problem_of_a_file_and_the_nearest_label(tmp_path):
    from post_fl.core.data import nearest_label, scan_text_file, training_label_names

    p = tmp_path / "t.csv"
    p.write_text("text,label\n,positive\ngood,\n,negative\nok,positive\n")
    with pytest.raises(DataError) as exc:
        read_text_file(p)
    msg = str(exc.value)
    assert "rows 1, 3: empty 'text'" in msg and "row 2: empty 'label'" in msg
    assert nearest_label("postive", ["negative", "positive"]) == "positive"
    assert nearest_label("zzz", ["negative", "positive"]) is None
    p.write_text("text,label\n" + "a,positive\n" * 5 + "b,negative\n" * 5 + "c,Postive\n")
    names, problems = training_label_names(scan_text_file(p), "label", None, min_label_count=5)
    assert len(problems) == 1 and "row 11: label 'Postive'" in problems[0] and "'positive'?" in problems[0]
    assert training_label_names(scan_text_file(p), "label", None, 5, allow_rare=True) == (
        ["Postive", "negative", "positive"], [])
