"""Routing rules: first match fires, conditions on contrast, header and calling AE."""

import pytest
from pydantic import ValidationError

from pipeline.dicom.contrast import Contrast, Direction
from pipeline.routing import Route, header_keywords, select_route

T1_HEADER = {
    "SeriesDescription": "AX T1 SE",
    "MagneticFieldStrength": 1.5,
    "ImageType": ["ORIGINAL", "PRIMARY", "M"],
    "Manufacturer": "SIEMENS",
}


def route(**fields) -> Route:
    return Route.model_validate(
        {"name": "r", "direction": "t1-to-t2", "destinations": ["pacs"]} | fields
    )


def test_default_contrast_is_the_directions_source():
    assert route().accepted_contrasts == [Contrast.T1]
    assert route(direction="t2-to-t1").accepted_contrasts == [Contrast.T2]
    assert route().model_name == "t1-to-t2"
    assert Direction.T1_TO_T2.target == Contrast.T2


def test_first_matching_route_fires():
    routes = [route(name="a", calling_ae=["MRI2"]), route(name="b"), route(name="c")]
    decision = select_route(routes, Contrast.T1, T1_HEADER, "MRI1")
    assert decision.route.name == "b"


def test_no_match_says_why_for_every_route():
    routes = [route(name="t1"), route(name="t2", direction="t2-to-t1")]
    decision = select_route(routes, Contrast.FLAIR, T1_HEADER, "MRI1")
    assert decision.route is None
    assert "route 't1': contrast FLAIR is not T1" in decision.reason
    assert "route 't2': contrast FLAIR is not T2" in decision.reason


def test_flair_only_when_a_rule_lists_it():
    assert select_route([route()], Contrast.T1C, T1_HEADER, "X").route is None
    assert select_route([route(contrast=["T1", "T1C"])], Contrast.T1C, T1_HEADER, "X").route


@pytest.mark.parametrize(
    ("match", "fires"),
    [
        ({"Manufacturer": "SIEMENS"}, True),
        ({"Manufacturer": "GE MEDICAL SYSTEMS"}, False),
        ({"SeriesDescription": {"regex": "(?i)t1"}}, True),
        ({"SeriesDescription": {"regex": "FLAIR"}}, False),
        ({"MagneticFieldStrength": {"min": 1.0, "max": 2.0}}, True),
        ({"MagneticFieldStrength": {"min": 2.5}}, False),
        ({"MagneticFieldStrength": 1.5}, True),
        ({"ImageType": {"regex": r"^ORIGINAL\\PRIMARY"}}, True),
        ({"BodyPartExamined": "BRAIN"}, False),  # absent from the header: no match
    ],
)
def test_header_conditions(match, fires):
    decision = select_route([route(match=match)], Contrast.T1, T1_HEADER, "MRI1")
    assert (decision.route is not None) == fires, decision.reason


def test_bad_conditions_are_refused():
    with pytest.raises(ValidationError, match="not a DICOM keyword"):
        route(match={"SeriesDescriptoin": "x"})
    with pytest.raises(ValidationError, match="not valid"):
        route(match={"SeriesDescription": {"regex": "("}})
    with pytest.raises(ValidationError, match="exactly one"):
        route(match={"EchoTime": {"regex": "1", "min": 1}})


def test_header_keywords_collects_what_routes_read():
    routes = [route(match={"StationName": "MR1"}), route(match={"Manufacturer": "GE"})]
    assert header_keywords(routes) == {"StationName", "Manufacturer"}
