"""dicomweb-gateway: DICOMweb in front of DIMSE-only PACS."""

from pydicom import config as _pydicom_config

# PACS answer with whatever their decades-old databases hold (DA "2019.01.31", DS with spaces...).
# The gateway passes such values on (normalising what viewers need) instead of warning per element.
_pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE
_pydicom_config.settings.writing_validation_mode = _pydicom_config.IGNORE
