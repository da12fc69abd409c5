//! Apple Silicon chips: which class a chip name belongs to and how much
//! memory bandwidth it has.
//!
//! Token generation on Apple Silicon is bound by memory bandwidth, so the
//! planner wants this figure, and macOS does not report it anywhere: it comes
//! from the table below, keyed by the chip name (`machdep.cpu.brand_string`)
//! and the GPU core count (the Max chips come in bins that differ).

use std::ops::RangeInclusive;

use serde::Serialize;

/// The tier of an Apple Silicon chip within its generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChipClass {
    /// The plain chip ("Apple M2").
    Base,
    Pro,
    Max,
    /// Two Max dies joined ("Apple M2 Ultra").
    Ultra,
}

/// One row of the chip table: a chip (or one GPU bin of it) and its memory
/// bandwidth.
#[derive(Clone, Debug, PartialEq)]
pub struct ChipSpec {
    /// Generation, "M1" to "M4".
    pub family: &'static str,
    pub class: ChipClass,
    /// GPU core counts sold in this configuration.
    pub gpu_cores: RangeInclusive<u32>,
    /// Memory bandwidth in GB/s.
    pub bandwidth_gbs: f64,
}

const fn spec(
    family: &'static str,
    class: ChipClass,
    gpu_cores: RangeInclusive<u32>,
    bandwidth_gbs: f64,
) -> ChipSpec {
    ChipSpec {
        family,
        class,
        gpu_cores,
        bandwidth_gbs,
    }
}

/// Known Apple Silicon chips, rows of one chip ordered by GPU core count.
///
/// Source: Apple marketing figures as collected in public tables (Ars
/// Technica, llama.cpp PR #1642). The M3 Max and M4 Max have two bins with
/// different memory buses, hence two rows each.
pub const CHIPS: &[ChipSpec] = &[
    spec("M1", ChipClass::Base, 7..=8, 68.25),
    spec("M1", ChipClass::Pro, 14..=16, 200.0),
    spec("M1", ChipClass::Max, 24..=32, 400.0),
    spec("M1", ChipClass::Ultra, 48..=64, 800.0),
    spec("M2", ChipClass::Base, 8..=10, 100.0),
    spec("M2", ChipClass::Pro, 16..=19, 200.0),
    spec("M2", ChipClass::Max, 30..=38, 400.0),
    spec("M2", ChipClass::Ultra, 60..=76, 800.0),
    spec("M3", ChipClass::Base, 8..=10, 100.0),
    spec("M3", ChipClass::Pro, 14..=18, 150.0),
    spec("M3", ChipClass::Max, 30..=30, 300.0),
    spec("M3", ChipClass::Max, 40..=40, 400.0),
    spec("M3", ChipClass::Ultra, 60..=80, 819.0),
    spec("M4", ChipClass::Base, 8..=10, 120.0),
    spec("M4", ChipClass::Pro, 16..=20, 273.0),
    spec("M4", ChipClass::Max, 32..=32, 410.0),
    spec("M4", ChipClass::Max, 40..=40, 546.0),
];

/// Splits an Apple Silicon chip name into its generation ("M3") and class.
///
/// Accepts names as `machdep.cpu.brand_string` prints them: "Apple M1",
/// "Apple M3 Max", "Apple M1 (Virtual)" inside a VM. Generations not in the
/// table ("Apple M5 Pro") still parse.
fn parse_chip(chip: &str) -> Option<(&str, ChipClass)> {
    let mut words = chip.split_whitespace();
    words.by_ref().find(|w| *w == "Apple")?;
    let family = words.next()?;
    let digits = family.strip_prefix('M')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let class = match words.next().map(str::to_ascii_lowercase).as_deref() {
        Some("pro") => ChipClass::Pro,
        Some("max") => ChipClass::Max,
        Some("ultra") => ChipClass::Ultra,
        _ => ChipClass::Base,
    };
    Some((family, class))
}

/// The class of an Apple Silicon chip name, or `None` for anything that is
/// not `"Apple M<n> [Pro|Max|Ultra]"` (Intel CPUs, "VirtualApple" under
/// Rosetta, empty strings).
pub fn classify(chip: &str) -> Option<ChipClass> {
    parse_chip(chip).map(|(_, class)| class)
}

/// The table row for a chip and GPU core count.
///
/// With a known core count the row whose bin contains it wins; a count
/// between bins picks the largest bin below it. With an unknown count the
/// lowest bin is returned, which is the conservative choice for the Max
/// chips. `None` for chips not in the table.
pub fn chip_spec(chip: &str, gpu_cores: Option<u32>) -> Option<&'static ChipSpec> {
    let (family, class) = parse_chip(chip)?;
    let rows = CHIPS
        .iter()
        .filter(|row| row.family == family && row.class == class);
    let lowest = rows.clone().next()?;
    let Some(cores) = gpu_cores else {
        return Some(lowest);
    };
    let row = rows
        .clone()
        .find(|row| row.gpu_cores.contains(&cores))
        .or_else(|| rows.clone().rfind(|row| *row.gpu_cores.start() <= cores))
        .unwrap_or(lowest);
    Some(row)
}

/// Memory bandwidth in GB/s of an Apple Silicon chip, from [`CHIPS`].
///
/// `gpu_cores` picks the bin of the Max chips (M3 Max 30-core 300 GB/s,
/// 40-core 400 GB/s); see [`chip_spec`] for how gaps and unknowns resolve.
pub fn memory_bandwidth_gbs(chip: &str, gpu_cores: Option<u32>) -> Option<f64> {
    chip_spec(chip, gpu_cores).map(|row| row.bandwidth_gbs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_known_and_future_chips() {
        let cases = [
            ("Apple M1", Some(ChipClass::Base)),
            ("Apple M2", Some(ChipClass::Base)),
            ("Apple M3 Max", Some(ChipClass::Max)),
            ("Apple M4 Pro", Some(ChipClass::Pro)),
            ("Apple M1 Ultra", Some(ChipClass::Ultra)),
            ("Apple M5 Pro", Some(ChipClass::Pro)),
            ("Apple M12 Ultra", Some(ChipClass::Ultra)),
            ("Apple M1 (Virtual)", Some(ChipClass::Base)),
            ("  Apple   M2   Max  ", Some(ChipClass::Max)),
            ("VirtualApple @ 2.50GHz processor", None),
            ("Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz", None),
            ("Intel(R) Core(TM) m3-7Y30 CPU @ 1.00GHz", None),
            ("Apple A18 Pro", None),
            ("Apple M", None),
            ("Apple", None),
            ("", None),
        ];
        for (chip, want) in cases {
            assert_eq!(classify(chip), want, "{chip:?}");
        }
    }

    #[test]
    fn bandwidth_by_chip_and_bin() {
        let cases = [
            ("Apple M1", Some(8), Some(68.25)),
            ("Apple M1", Some(7), Some(68.25)),
            ("Apple M1 Pro", Some(16), Some(200.0)),
            ("Apple M1 Max", Some(24), Some(400.0)),
            ("Apple M1 Ultra", Some(64), Some(800.0)),
            ("Apple M2", None, Some(100.0)),
            ("Apple M2 Pro", Some(19), Some(200.0)),
            ("Apple M2 Max", Some(38), Some(400.0)),
            ("Apple M2 Ultra", Some(76), Some(800.0)),
            ("Apple M3", Some(10), Some(100.0)),
            ("Apple M3 Pro", Some(18), Some(150.0)),
            ("Apple M3 Max", Some(30), Some(300.0)),
            ("Apple M3 Max", Some(40), Some(400.0)),
            ("Apple M3 Ultra", Some(80), Some(819.0)),
            ("Apple M4", Some(10), Some(120.0)),
            ("Apple M4 Pro", Some(20), Some(273.0)),
            ("Apple M4 Max", Some(32), Some(410.0)),
            ("Apple M4 Max", Some(40), Some(546.0)),
            // Unknown count: the lowest bin.
            ("Apple M3 Max", None, Some(300.0)),
            ("Apple M4 Max", None, Some(410.0)),
            // Between bins: the bin below; below all bins: the lowest.
            ("Apple M4 Max", Some(36), Some(410.0)),
            ("Apple M4 Max", Some(48), Some(546.0)),
            ("Apple M4 Max", Some(0), Some(410.0)),
            // Not in the table.
            ("Apple M5 Pro", Some(20), None),
            ("Intel(R) Xeon(R) Processor @ 2.50GHz", None, None),
            ("", None, None),
        ];
        for (chip, cores, want) in cases {
            assert_eq!(
                memory_bandwidth_gbs(chip, cores),
                want,
                "{chip:?} {cores:?}"
            );
        }
    }

    #[test]
    fn table_rows_are_sane() {
        for row in CHIPS {
            assert!(row.gpu_cores.start() <= row.gpu_cores.end(), "{row:?}");
            assert!(row.bandwidth_gbs > 0.0, "{row:?}");
            let name = match row.class {
                ChipClass::Base => format!("Apple {}", row.family),
                class => format!("Apple {} {class:?}", row.family),
            };
            assert_eq!(classify(&name), Some(row.class), "{name}");
            let spec = chip_spec(&name, Some(*row.gpu_cores.end()));
            assert_eq!(spec, Some(row), "{name}");
        }
    }

    #[test]
    fn chip_class_serializes_lowercase() {
        let json = serde_json::to_string(&ChipClass::Ultra).unwrap();
        assert_eq!(json, "\"ultra\"");
    }
}
