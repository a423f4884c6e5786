import itertools

import numpy as np
import pytest

from mushroomclip.taxonomy import RANKS, TaxonomyError, load_taxonomy

HEADER = "label,kingdom,phylum,class,order,family,genus,common_name,edibility,lichen,synonym_of\n"


def test_bundled_table_has_169_species_in_a_stable_order():
    tax = load_taxonomy()
    assert len(tax) == 169
    assert tax.classes == sorted(tax.classes)  # ids are row indices of the alphabetical table
    assert tax.id("Agaricus augustus") == 0
    assert tax.classes[tax.id("Amanita muscaria")] == "Amanita muscaria"
    assert load_taxonomy() is load_taxonomy()  # parsed once


def test_lineage_runs_from_kingdom_to_species():
    assert load_taxonomy().lineage("Amanita muscaria") == {
        "kingdom": "Fungi",
        "phylum": "Basidiomycota",
        "class": "Agaricomycetes",
        "order": "Agaricales",
        "family": "Amanitaceae",
        "genus": "Amanita",
        "species": "Amanita muscaria",
    }


def test_lca_depth_counts_shared_ranks():
    tax = load_taxonomy()
    assert tax.lca_depth("Amanita muscaria", "Amanita muscaria") == 7
    assert tax.lca_depth("Amanita muscaria", "Amanita phalloides") == 6  # same genus
    assert tax.lca_depth("Amanita muscaria", "Agaricus augustus") == 4  # same order, other family
    assert tax.lca_depth("Amanita muscaria", "Verpa bohemica") == 1  # an ascomycete: kingdom only
    assert tax.lca_depth("Amanita muscaria", "Lycogala epidendrum") == 0  # a slime mould: other kingdom


def test_vectorised_lca_matrix_matches_pairwise_definition():
    tax = load_taxonomy()
    matrix = tax.lca_depth_matrix
    rng = np.random.default_rng(0)
    for a, b in rng.integers(0, 169, (500, 2)):
        assert matrix[a, b] == tax.lca_depth(tax.classes[a], tax.classes[b])
    assert (np.diag(matrix) == len(RANKS)).all()


@pytest.mark.parametrize(
    ("text_type", "muscaria", "tabescens"),
    [
        ("sci", "Amanita muscaria", "Armillaria tabescens"),
        ("com", "fly agaric", "ringless honey mushroom"),
        (
            "taxon",
            "Fungi Basidiomycota Agaricomycetes Agaricales Amanitaceae Amanita muscaria",
            "Fungi Basidiomycota Agaricomycetes Agaricales Physalacriaceae Desarmillaria tabescens",
        ),
        (
            "sci_com",
            "Amanita muscaria with common name fly agaric",
            "Armillaria tabescens with common name ringless honey mushroom",
        ),
        (
            "taxon_com",
            "Fungi Basidiomycota Agaricomycetes Agaricales Amanitaceae Amanita muscaria with common name fly agaric",
            "Fungi Basidiomycota Agaricomycetes Agaricales Physalacriaceae Desarmillaria tabescens with common name ringless honey mushroom",
        ),
    ],
)
def test_text_renderings(text_type, muscaria, tabescens):
    tax = load_taxonomy()
    assert tax.text("Amanita muscaria", text_type) == muscaria
    assert tax.text("Armillaria tabescens", text_type) == tabescens  # the table's genus is the current one


def test_unknown_species_error_names_it_and_the_fix():
    with pytest.raises(TaxonomyError, match=r"'Boletus imaginarius' is not in the taxonomy.*--taxonomy FILE"):
        load_taxonomy().id("Boletus imaginarius")
    with pytest.raises(ValueError, match="unknown text type 'latin'"):
        load_taxonomy().text("Amanita muscaria", "latin")


def test_custom_table_is_loaded_and_fingerprinted(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text(
        HEADER + "Fakeus fungus,Fungi,Basidiomycota,Agaricomycetes,Agaricales,Fakeaceae,Fakeus,fake cap,edible,no,\n"
    )
    tax = load_taxonomy(path)
    assert tax.classes == ["Fakeus fungus"] and tax.source == str(path.resolve())
    assert tax.fingerprint != load_taxonomy().fingerprint


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("label,kingdom\nA b,Fungi\n", "missing column"),
        ("A b,Fungi,P,C,O,F,A,x,edible,no,\nA b,Fungi,P,C,O,F,A,x,edible,no,\n", "line 3: species 'A b' appears twice"),
        ("A b,Fungi,P,C,O,F,A,x,tasty,no,\n", "line 2: edibility 'tasty'"),
        ("A b,Fungi,,C,O,F,A,x,edible,no,\n", "line 2: empty phylum"),
    ],
)
def test_malformed_table_errors_point_at_the_line(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body if body.startswith("label") else HEADER + body)
    with pytest.raises(TaxonomyError, match=message):
        load_taxonomy(path)


def test_missing_table_file_is_a_clear_error(tmp_path):
    with pytest.raises(TaxonomyError, match="does not exist"):
        load_taxonomy(tmp_path / "nope.csv")


def test_taxonomic_order_groups_families():
    tax = load_taxonomy()
    order = tax.taxonomic_order()
    families = [tax.species[i].lineage[:5] for i in order]
    # each (kingdom..family) path forms one contiguous block
    blocks = [k for k, _ in itertools.groupby(families)]
    assert len(blocks) == len(set(blocks))
