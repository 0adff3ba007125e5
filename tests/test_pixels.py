"""Display conversion: photometric, compression, and refusal of broken pixel data."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from pacsnode.errors import InputError
from pacsnode.phantoms.cxr import make_cxr_dataset
from pacsnode.pixels import to_display_array

SIZE = dict(rows=160, cols=192)


@pytest.mark.parametrize("window", [False, True])
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_monochrome1_matches_monochrome2(window: bool, bits: int) -> None:
    mono2, _ = make_cxr_dataset(
        5, photometric="MONOCHROME2", window=window, bits_stored=bits, **SIZE
    )
    mono1, _ = make_cxr_dataset(
        5, photometric="MONOCHROME1", window=window, bits_stored=bits, **SIZE
    )
    a2 = to_display_array(mono2)
    a1 = to_display_array(mono1)
    assert a1.shape == a2.shape == (160, 192)
    assert a1.dtype == np.float32
    step = 2.0 / (2**bits - 1) * 1.3  # window rounding differs by at most about a grey level
    np.testing.assert_allclose(a1, a2, atol=max(step, 1e-5))
    assert a2.min() >= 0.0 and a2.max() <= 1.0


def test_bright_means_dense() -> None:
    ds, _ = make_cxr_dataset(6, photometric="MONOCHROME1", **SIZE)
    img = to_display_array(ds)
    # the spine (image centre column band) is denser than the lateral air outside the body
    assert img[80, 90:102].mean() > img[80, :4].mean() + 0.3


@pytest.mark.parametrize("signed", [0, 1])
def test_cr_rescale_and_signed(signed: int) -> None:
    plain, _ = make_cxr_dataset(8, modality="CR", window=False, **SIZE)
    other, _ = make_cxr_dataset(
        8, modality="CR", window=False, rescale=True, pixel_representation=signed, **SIZE
    )
    np.testing.assert_allclose(to_display_array(plain), to_display_array(other), atol=1e-5)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless])
@pytest.mark.parametrize("bits", [8, 12])
def test_compressed_decodes_like_uncompressed(syntax: str, bits: int) -> None:
    raw, _ = make_cxr_dataset(7, modality="CR", bits_stored=bits, **SIZE)
    packed, _ = make_cxr_dataset(7, modality="CR", bits_stored=bits, transfer_syntax=syntax, **SIZE)
    assert packed.file_meta.TransferSyntaxUID == syntax
    assert len(packed.PixelData) != len(raw.PixelData)
    np.testing.assert_array_equal(to_display_array(packed), to_display_array(raw))


def test_wrong_pixel_length_raises() -> None:
    ds, _ = make_cxr_dataset(9, **SIZE)
    ds.PixelData = ds.PixelData[:-100]
    with pytest.raises(InputError, match=ds.SOPInstanceUID):
        to_display_array(ds)


def test_missing_pixel_data_raises() -> None:
    ds, _ = make_cxr_dataset(9, **SIZE)
    del ds.PixelData
    with pytest.raises(InputError, match="no Pixel Data"):
        to_display_array(ds)


def test_huge_dimensions_refused_before_decoding() -> None:
    ds, _ = make_cxr_dataset(10, **SIZE)
    ds.Rows = 40000
    with pytest.raises(InputError, match="40000"):
        to_display_array(ds)


def test_multiframe_refused() -> None:
    ds, _ = make_cxr_dataset(11, **SIZE)
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(InputError, match="2 frames"):
        to_display_array(ds)
