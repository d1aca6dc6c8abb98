"""Code catalogue of the synthetic cohort: diagnoses, procedures, medications, labs and code-system URIs.

Diagnosis and procedure codes are stored in their dotted form (ICD-10-CM `I50.9`, ICD-9-CM `428.0`,
ICD-9 procedures `38.93`); MIMIC style writes them without dots. The condition groups and their ICD
prefixes are the ones fixed in the project contracts (the `conditions` task).
"""

from __future__ import annotations

from typing import NamedTuple

# ---------------------------------------------------------------------------------------------- URIs
MIMIC_CS = "http://mimic.mit.edu/fhir/mimic/CodeSystem/"
MIMIC_SD = "http://mimic.mit.edu/fhir/mimic/StructureDefinition/"
MIMIC_DIAGNOSIS_ICD9 = MIMIC_CS + "mimic-diagnosis-icd9"
MIMIC_DIAGNOSIS_ICD10 = MIMIC_CS + "mimic-diagnosis-icd10"
MIMIC_PROCEDURE_ICD9 = MIMIC_CS + "mimic-procedure-icd9"
MIMIC_PROCEDURE_ICD10 = MIMIC_CS + "mimic-procedure-icd10"
MIMIC_MEDICATION_NDC = MIMIC_CS + "mimic-medication-ndc"
MIMIC_LABITEMS = MIMIC_CS + "mimic-d-labitems"
MIMIC_UNITS = MIMIC_CS + "mimic-units"
MIMIC_DISCHARGE_DISPOSITION = MIMIC_CS + "mimic-discharge-disposition"
MIMIC_SERVICES = MIMIC_CS + "mimic-services"
MIMIC_MEDICATION_ROUTE = MIMIC_CS + "mimic-medication-route"
MIMIC_PATIENT_IDENTIFIER = "http://mimic.mit.edu/fhir/mimic/identifier/patient"

ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD9CM = "http://hl7.org/fhir/sid/icd-9-cm"  # also carries ICD-9-CM volume 3 (procedures) in plain R4
ICD10PCS = "http://www.cms.gov/Medicare/Coding/ICD10"
NDC = "http://hl7.org/fhir/sid/ndc"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DISCHARGE_DISPOSITION = "http://terminology.hl7.org/CodeSystem/discharge-disposition"
SYNTH_IDENTIFIER = "urn:odyssey:synth:patient"

MIMIC_PROFILES = {
    "Patient": MIMIC_SD + "mimic-patient",
    "Encounter": MIMIC_SD + "mimic-encounter",
    "Condition": MIMIC_SD + "mimic-condition",
    "Procedure": MIMIC_SD + "mimic-procedure",
    "Medication": MIMIC_SD + "mimic-medication",
    "MedicationRequest": MIMIC_SD + "mimic-medication-request",
    "Observation": MIMIC_SD + "mimic-observation-labevents",
}
MIMIC_FILES = {
    "Patient": "MimicPatient",
    "Encounter": "MimicEncounter",
    "Condition": "MimicCondition",
    "Procedure": "MimicProcedure",
    "Medication": "MimicMedication",
    "MedicationRequest": "MimicMedicationRequest",
    "Observation": "MimicObservationLabevents",
}
RESOURCE_TYPES = tuple(MIMIC_FILES)

ENCOUNTER_CLASSES = {"IMP": "inpatient encounter", "EMER": "emergency", "AMB": "ambulatory"}

# ---------------------------------------------------------------------------------- condition groups
# Contracts: group name -> (ICD-10-CM prefixes, ICD-9-CM prefixes); matched after removing dots.
CONDITION_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "heart_failure": (("I50",), ("428",)),
    "diabetes": (("E10", "E11"), ("250",)),
    "chronic_kidney_disease": (("N18",), ("585",)),
    "copd": (("J44",), ("491", "492", "496")),
    "sepsis": (("A40", "A41"), ("038", "99591", "99592")),
    "pneumonia": (("J12", "J13", "J14", "J15", "J18"), ("480", "481", "482", "485", "486")),
}
GROUPS = tuple(CONDITION_GROUPS)
CHRONIC_GROUPS = ("heart_failure", "diabetes", "chronic_kidney_disease", "copd")
ACUTE_GROUPS = ("sepsis", "pneumonia")


def groups_of_code(code: str, icd10: bool) -> list[str]:
    """Condition groups an ICD diagnosis code (dotted or not) belongs to."""
    bare = code.replace(".", "")
    index = 0 if icd10 else 1
    return [g for g, prefixes in CONDITION_GROUPS.items() if bare.startswith(prefixes[index])]


class Dx(NamedTuple):
    """One diagnosis concept in both ICD versions (dotted codes)."""

    icd10: str
    icd9: str
    display: str


# Codes per condition group; the first of each list is the most common.
GROUP_DX: dict[str, tuple[Dx, ...]] = {
    "heart_failure": (
        Dx("I50.9", "428.0", "Heart failure, unspecified"),
        Dx("I50.22", "428.22", "Chronic systolic heart failure"),
        Dx("I50.32", "428.32", "Chronic diastolic heart failure"),
        Dx("I50.33", "428.33", "Acute on chronic diastolic heart failure"),
    ),
    "diabetes": (
        Dx("E11.9", "250.00", "Type 2 diabetes mellitus without complications"),
        Dx("E11.22", "250.40", "Type 2 diabetes mellitus with diabetic chronic kidney disease"),
        Dx("E11.65", "250.80", "Type 2 diabetes mellitus with hyperglycemia"),
        Dx("E10.9", "250.01", "Type 1 diabetes mellitus without complications"),
    ),
    "chronic_kidney_disease": (
        Dx("N18.3", "585.3", "Chronic kidney disease, stage 3"),
        Dx("N18.4", "585.4", "Chronic kidney disease, stage 4"),
        Dx("N18.9", "585.9", "Chronic kidney disease, unspecified"),
    ),
    "copd": (
        Dx("J44.9", "496", "Chronic obstructive pulmonary disease, unspecified"),
        Dx("J44.1", "491.21", "Chronic obstructive pulmonary disease with acute exacerbation"),
        Dx("J43.9", "492.8", "Emphysema, unspecified"),
    ),
    "sepsis": (
        Dx("A41.9", "038.9", "Sepsis, unspecified organism"),
        Dx("A41.51", "038.42", "Sepsis due to Escherichia coli"),
        Dx("A40.1", "038.0", "Sepsis due to streptococcus"),
    ),
    "pneumonia": (
        Dx("J18.9", "486", "Pneumonia, unspecified organism"),
        Dx("J15.9", "482.9", "Unspecified bacterial pneumonia"),
        Dx("J13", "481", "Pneumonia due to Streptococcus pneumoniae"),
        Dx("J12.89", "480.8", "Other viral pneumonia"),
    ),
}
# J43.9 (emphysema) is COPD clinically but not under the contract's ICD-10 prefix J44: keep the
# catalogue consistent with the label definition by never using it for the copd group.
GROUP_DX["copd"] = tuple(dx for dx in GROUP_DX["copd"] if groups_of_code(dx.icd10, True) == ["copd"])

CKD_STAGE5 = Dx("N18.6", "585.6", "End stage renal disease")

# Planted long-range marker (section "Planted signals" of docs/synthetic_cohort.md).
AMYLOIDOSIS = Dx("E85.4", "277.39", "Organ-limited amyloidosis")
TOBACCO_HISTORY = Dx("Z87.891", "V15.82", "Personal history of nicotine dependence")
DIALYSIS_STATUS = Dx("Z99.2", "V45.11", "Dependence on renal dialysis")

# Background diagnoses that never fall in a condition group (checked at import).
BACKGROUND_DX: tuple[Dx, ...] = (
    Dx("I10", "401.9", "Essential (primary) hypertension"),
    Dx("E78.5", "272.4", "Hyperlipidemia, unspecified"),
    Dx("I48.91", "427.31", "Unspecified atrial fibrillation"),
    Dx("I25.10", "414.01", "Atherosclerotic heart disease of native coronary artery"),
    Dx("K21.9", "530.81", "Gastro-esophageal reflux disease without esophagitis"),
    Dx("F32.9", "311", "Major depressive disorder, single episode, unspecified"),
    Dx("E03.9", "244.9", "Hypothyroidism, unspecified"),
    Dx("E66.9", "278.00", "Obesity, unspecified"),
    Dx("M19.90", "715.90", "Unspecified osteoarthritis, unspecified site"),
    Dx("D64.9", "285.9", "Anemia, unspecified"),
    Dx("E87.1", "276.1", "Hypo-osmolality and hyponatremia"),
    Dx("E87.6", "276.8", "Hypokalemia"),
    Dx("G47.33", "327.23", "Obstructive sleep apnea"),
)
# Principal reasons for admissions that are not sepsis / pneumonia / exacerbations.
OTHER_REASON_DX: tuple[Dx, ...] = (
    Dx("N17.9", "584.9", "Acute kidney failure, unspecified"),
    Dx("N39.0", "599.0", "Urinary tract infection, site not specified"),
    Dx("K92.2", "578.9", "Gastrointestinal hemorrhage, unspecified"),
    Dx("R07.9", "786.50", "Chest pain, unspecified"),
    Dx("I21.4", "410.71", "Non-ST elevation myocardial infarction"),
    Dx("S72.001A", "820.8", "Fracture of unspecified part of neck of femur"),
    Dx("L03.90", "682.9", "Cellulitis, unspecified"),
    Dx("R55", "780.2", "Syncope and collapse"),
    Dx("K85.90", "577.0", "Acute pancreatitis"),
    Dx("I63.9", "434.91", "Cerebral infarction, unspecified"),
)
ED_DX: tuple[Dx, ...] = (
    Dx("R07.9", "786.50", "Chest pain, unspecified"),
    Dx("R55", "780.2", "Syncope and collapse"),
    Dx("R06.02", "786.05", "Shortness of breath"),
    Dx("R10.9", "789.00", "Unspecified abdominal pain"),
    Dx("W19.XXXA", "E888.9", "Unspecified fall, initial encounter"),
    Dx("R51.9", "784.0", "Headache, unspecified"),
)


class Proc(NamedTuple):
    icd10pcs: str
    icd9: str  # dotted ICD-9-CM volume 3
    display: str


PROCEDURES: dict[str, Proc] = {
    "central_line": Proc("02HV33Z", "38.93", "Insertion of infusion device into superior vena cava"),
    "ventilation_short": Proc("5A1935Z", "96.71", "Mechanical ventilation, less than 24 consecutive hours"),
    "ventilation_long": Proc("5A1955Z", "96.72", "Mechanical ventilation, greater than 96 consecutive hours"),
    "hemodialysis": Proc("5A1D70Z", "39.95", "Hemodialysis"),
    "transfusion": Proc("30233N1", "99.04", "Transfusion of nonautologous red blood cells"),
    "bronchoscopy": Proc("0BJ08ZZ", "33.22", "Fiber-optic bronchoscopy"),
    "echocardiogram": Proc("B246ZZZ", "88.72", "Diagnostic ultrasound of heart"),
    "cardiac_cath": Proc("4A023N7", "37.22", "Left heart cardiac catheterization"),
    "thoracentesis": Proc("0W9930Z", "34.91", "Thoracentesis"),
    "egd": Proc("0DJ08ZZ", "45.13", "Esophagogastroduodenoscopy"),
}


class Drug(NamedTuple):
    ndc: str  # 11-digit, no dashes (MIMIC style)
    name: str
    route: str
    dose: float
    dose_unit: str


# Well-formed 11-digit NDCs for a small formulary (synthetic product codes, documented as such).
DRUGS: dict[str, Drug] = {
    "furosemide_iv": Drug("00641619225", "Furosemide 10 mg/mL injection", "IV", 40.0, "mg"),
    "furosemide_po": Drug("00054429725", "Furosemide 40 mg tablet", "PO", 40.0, "mg"),
    "metoprolol": Drug("00378003201", "Metoprolol tartrate 25 mg tablet", "PO", 25.0, "mg"),
    "lisinopril": Drug("00172375810", "Lisinopril 10 mg tablet", "PO", 10.0, "mg"),
    "insulin_glargine": Drug("00088222033", "Insulin glargine 100 unit/mL", "SC", 20.0, "U"),
    "insulin_regular": Drug("00169183311", "Insulin regular human 100 unit/mL", "SC", 4.0, "U"),
    "metformin": Drug("00093101701", "Metformin 500 mg tablet", "PO", 500.0, "mg"),
    "epoetin": Drug("55513012610", "Epoetin alfa 10,000 unit/mL", "SC", 10000.0, "U"),
    "sevelamer": Drug("58468013001", "Sevelamer carbonate 800 mg tablet", "PO", 800.0, "mg"),
    "tiotropium": Drug("00597007541", "Tiotropium 18 mcg inhalation capsule", "INH", 18.0, "ug"),
    "albuterol": Drug("00487950101", "Albuterol 0.083% nebulizer solution", "NEB", 2.5, "mg"),
    "prednisone": Drug("00054474025", "Prednisone 20 mg tablet", "PO", 40.0, "mg"),
    "vancomycin": Drug("00409653111", "Vancomycin 1 g injection", "IV", 1000.0, "mg"),
    "piperacillin_tazobactam": Drug("00206886102", "Piperacillin-tazobactam 4.5 g injection", "IV", 4.5, "g"),
    "norepinephrine": Drug("00409144301", "Norepinephrine 4 mg/4 mL injection", "IV", 4.0, "mg"),
    "ceftriaxone": Drug("00409733201", "Ceftriaxone 1 g injection", "IV", 1.0, "g"),
    "azithromycin": Drug("00069315083", "Azithromycin 500 mg injection", "IV", 500.0, "mg"),
    "heparin": Drug("63323026201", "Heparin 5,000 unit/mL injection", "SC", 5000.0, "U"),
    "acetaminophen": Drug("00904198861", "Acetaminophen 325 mg tablet", "PO", 650.0, "mg"),
    "pantoprazole": Drug("00008084199", "Pantoprazole 40 mg tablet", "PO", 40.0, "mg"),
    "sodium_chloride": Drug("00338004904", "Sodium chloride 0.9% 1000 mL", "IV", 1000.0, "mL"),
    "potassium_chloride": Drug("00245004101", "Potassium chloride 20 mEq tablet", "PO", 20.0, "meq"),
    "atorvastatin": Drug("00071015523", "Atorvastatin 20 mg tablet", "PO", 20.0, "mg"),
    "aspirin": Drug("63739043601", "Aspirin 81 mg chewable tablet", "PO", 81.0, "mg"),
}
DRUG_KEYS = tuple(DRUGS)


class Lab(NamedTuple):
    """A lab item. `log_scale` labs are lognormal around `center`; others are normal."""

    name: str
    itemid: str  # MIMIC-IV d_labitems itemid
    loinc: str
    unit: str  # MIMIC unit string
    ucum: str
    low: float  # reference range
    high: float
    center: float
    spread: float  # sd (normal) or log-sd (lognormal)
    log_scale: bool
    decimals: int


LABS: dict[str, Lab] = {
    "creatinine": Lab("Creatinine", "50912", "2160-0", "mg/dL", "mg/dL", 0.5, 1.2, 0.9, 0.22, True, 1),
    "bun": Lab("Urea Nitrogen", "51006", "3094-0", "mg/dL", "mg/dL", 6, 20, 15, 0.3, True, 0),
    "sodium": Lab("Sodium", "50983", "2951-2", "mEq/L", "meq/L", 133, 145, 139, 2.8, False, 0),
    "potassium": Lab("Potassium", "50971", "2823-3", "mEq/L", "meq/L", 3.3, 5.1, 4.2, 0.4, False, 1),
    "chloride": Lab("Chloride", "50902", "2075-0", "mEq/L", "meq/L", 96, 108, 102, 3.0, False, 0),
    "bicarbonate": Lab("Bicarbonate", "50882", "1963-8", "mEq/L", "meq/L", 22, 32, 25, 2.5, False, 0),
    "glucose": Lab("Glucose", "50931", "2345-7", "mg/dL", "mg/dL", 70, 100, 105, 0.2, True, 0),
    "hemoglobin": Lab("Hemoglobin", "51222", "718-7", "g/dL", "g/dL", 12.0, 17.5, 13.2, 1.2, False, 1),
    "wbc": Lab("White Blood Cells", "51301", "6690-2", "K/uL", "10*3/uL", 4.0, 11.0, 7.5, 0.25, True, 1),
    "platelets": Lab("Platelet Count", "51265", "777-3", "K/uL", "10*3/uL", 150, 440, 240, 60, False, 0),
    "lactate": Lab("Lactate", "50813", "2524-7", "mmol/L", "mmol/L", 0.5, 2.0, 1.2, 0.3, True, 1),
    "albumin": Lab("Albumin", "50862", "1751-7", "g/dL", "g/dL", 3.5, 5.2, 4.0, 0.35, False, 1),
    "ntprobnp": Lab("NTproBNP", "50963", "33762-6", "pg/mL", "pg/mL", 0, 450, 150, 0.7, True, 0),
    "troponin": Lab("Troponin T", "51003", "6598-7", "ng/mL", "ng/mL", 0, 0.01, 0.01, 0.6, True, 2),
    "hba1c": Lab("% Hemoglobin A1c", "50852", "4548-4", "%", "%", 4.0, 6.0, 5.3, 0.3, False, 1),
    "magnesium": Lab("Magnesium", "50960", "19123-9", "mg/dL", "mg/dL", 1.6, 2.6, 2.0, 0.2, False, 1),
    "bilirubin": Lab("Bilirubin, Total", "50885", "1975-2", "mg/dL", "mg/dL", 0.0, 1.5, 0.6, 0.4, True, 1),
}
LAB_KEYS = tuple(LABS)
LAB_INDEX = {key: i for i, key in enumerate(LAB_KEYS)}

# Discharge dispositions: MIMIC discharge_location -> R4 discharge-disposition code.
DISPOSITIONS = {
    "HOME": "home",
    "HOME HEALTH CARE": "alt-home",
    "SKILLED NURSING FACILITY": "snf",
    "REHAB": "rehab",
    "HOSPICE": "hosp",
    "AGAINST ADVICE": "aadvice",
    "DIED": "exp",
}
SERVICES = {"MED": "Medical", "CMED": "Cardiac Medical", "SURG": "Surgical", "NMED": "Neurologic Medical"}


def _check_catalogue() -> None:
    """Background and marker codes must never match a condition group (labels detect groups by prefix)."""
    neutral = (*BACKGROUND_DX, *OTHER_REASON_DX, *ED_DX, AMYLOIDOSIS, TOBACCO_HISTORY, DIALYSIS_STATUS)
    for dx in neutral:
        if groups_of_code(dx.icd10, True) or groups_of_code(dx.icd9, False):
            raise AssertionError(f"catalogue code {dx} falls in a condition group")
    for group, codes in GROUP_DX.items():
        for dx in (*codes, *((CKD_STAGE5,) if group == "chronic_kidney_disease" else ())):
            if groups_of_code(dx.icd10, True) != [group] or groups_of_code(dx.icd9, False) != [group]:
                raise AssertionError(f"catalogue code {dx} is not exactly in group {group}")


_check_catalogue()
