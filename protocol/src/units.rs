//! Quantities with units. All are integers: signed messages must encode the
//! same way on every machine, and money must never be rounded by a float.
//!
//! For humans (TOML specs, JSON) they accept friendly forms — `cpus = 1.5`,
//! `memory = "512MiB"`, `timeout = "10m"` — and they always encode as plain
//! integers in the canonical binary form.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// CPU in thousandths of a core (`cpus = 0.5` is `MilliCpu(500)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MilliCpu(pub u32);

/// A size in bytes (`"2GiB"`, `"512MB"`, or a plain integer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// A duration in whole seconds (`"90s"`, `"10m"`, `"2h"`, or an integer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Seconds(pub u64);

/// Money in micro-credits (1 credit = 1_000_000 µcr). Always an integer.
/// It serializes as the integer of micro-credits; humans may also write a
/// string with a unit (`"2.5cr"`, `"2500000µcr"`, see its `FromStr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
#[serde(transparent)]
pub struct Credits(pub u64);

impl<'de> Deserialize<'de> for Credits {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if !d.is_human_readable() {
            return Ok(Self(u64::deserialize(d)?));
        }
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Credits;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "micro-credits as an integer, or a string with a unit such as \"2.5cr\"",
                )
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Credits, E> {
                Ok(Credits(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Credits, E> {
                u64::try_from(v)
                    .map(Credits)
                    .map_err(|_| E::custom("an amount of money cannot be negative"))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Credits, E> {
                Err(E::custom(format!(
                    "{v} is not whole micro-credits; write an integer of µcr or a string such as \"{v}cr\""
                )))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Credits, E> {
                let t = v.trim();
                if !(t.ends_with("cr")) {
                    return Err(E::custom(format!(
                        "`{v}` has no unit: write \"{t}cr\" for credits or \"{t}µcr\" for micro-credits (a bare integer is micro-credits)"
                    )));
                }
                t.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Milliseconds since the Unix epoch.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
    pub fn plus_secs(self, s: u64) -> Self {
        Self(self.0.saturating_add(s.saturating_mul(1000)))
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:06} cr", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

/// Credits as people write them: `12`, `12.5`, `0.000001`, `12cr`,
/// `12.5 cr` (credits, at most six decimals), or `2500000µcr` / `ucr`
/// (micro-credits). What [`Credits`]' `Display` prints parses back.
impl std::str::FromStr for Credits {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let bad = |why: &str| {
            format!(
                "`{s}` is not an amount of credits ({why}); write e.g. 12.5 or 12.5cr (credits) or 2500000µcr"
            )
        };
        for micro in ["µcr", "ucr"] {
            if let Some(n) = t.strip_suffix(micro) {
                return n
                    .trim()
                    .parse::<u64>()
                    .map(Credits)
                    .map_err(|_| bad("micro-credits are a whole number"));
            }
        }
        let n = t.strip_suffix("cr").unwrap_or(t).trim();
        let (whole, frac) = n.split_once('.').unwrap_or((n, ""));
        if whole.is_empty() && frac.is_empty() {
            return Err(bad("no digits"));
        }
        if frac.len() > 6 {
            return Err(bad("more than six decimals: 1 µcr is 0.000001 cr"));
        }
        let digits = |d: &str| d.is_empty() || d.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !digits(frac) {
            return Err(bad("not a number"));
        }
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad("too large"))?
        };
        let frac: u64 = format!("{frac:0<6}")
            .parse()
            .map_err(|_| bad("not a number"))?;
        whole
            .checked_mul(1_000_000)
            .and_then(|w| w.checked_add(frac))
            .map(Credits)
            .ok_or_else(|| bad("too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, size) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{name}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl fmt::Display for MilliCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}", self.0 / 1000)
        } else {
            write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
        }
    }
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}s", self.0)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_byte_size(s).map(ByteSize)
    }
}

pub fn parse_byte_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("`{s}` is not a size; write e.g. 512MiB, 2GiB or a number of bytes")
    })?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1000,
        "KiB" => 1 << 10,
        "M" | "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "G" | "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        "TB" => 1000 * 1000 * 1000 * 1000,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}`; use B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

pub fn parse_seconds(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration; write e.g. 90s, 10m or 2h"))?;
    let mult = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        other => return Err(format!("unknown duration unit `{other}`; use s, m, h or d")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

impl Serialize for MilliCpu {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            // Humans read cores; an integer here would mean cores on the way back in.
            s.serialize_f64(f64::from(self.0) / 1000.0)
        } else {
            self.0.serialize(s)
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// Human forms are strings or numbers; the canonical form is the integer.
macro_rules! int_unit {
    ($ty:ident, $inner:ty, $expect:expr, $parse_u64:expr, $parse_str:expr, $parse_f64:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if !d.is_human_readable() {
                    return Ok(Self(<$inner>::deserialize(d)?));
                }
                struct V;
                impl de::Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expect)
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$ty, E> {
                        let f: fn(u64) -> Result<$inner, String> = $parse_u64;
                        f(v).map($ty).map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$ty, E> {
                        let v = u64::try_from(v)
                            .map_err(|_| E::custom(format!("{v} must not be negative")))?;
                        self.visit_u64(v)
                    }
                    fn visit_f64<E: de::Error>(self, v: f64) -> Result<$ty, E> {
                        let f: fn(f64) -> Result<$inner, String> = $parse_f64;
                        f(v).map($ty).map_err(E::custom)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        let f: fn(&str) -> Result<$inner, String> = $parse_str;
                        f(v).map($ty).map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

int_unit!(
    MilliCpu,
    u32,
    "a number of CPUs such as 1 or 0.5",
    |v| u32::try_from(v)
        .ok()
        .and_then(|v| v.checked_mul(1000))
        .ok_or_else(|| format!("{v} CPUs is too many")),
    |s| s
        .trim()
        .parse::<f64>()
        .map_err(|_| format!("`{s}` is not a number of CPUs"))
        .and_then(cpus_from_f64),
    cpus_from_f64
);
int_unit!(
    ByteSize,
    u64,
    "a size such as \"512MiB\", \"2GiB\" or a number of bytes",
    Ok,
    parse_byte_size,
    |v| whole(v, "a size in bytes")
);
int_unit!(
    Seconds,
    u64,
    "a duration such as \"90s\", \"10m\", \"2h\" or a number of seconds",
    Ok,
    parse_seconds,
    |v| whole(v, "a number of seconds")
);

impl std::str::FromStr for Seconds {
    type Err = String;
    /// `"90s"`, `"10m"`, `"2h"` or a number of seconds (for flags).
    fn from_str(s: &str) -> Result<Self, String> {
        parse_seconds(s).map(Self)
    }
}

fn cpus_from_f64(v: f64) -> Result<u32, String> {
    if !(v.is_finite() && (0.0..=100_000.0).contains(&v)) {
        return Err(format!("{v} is not a valid number of CPUs"));
    }
    Ok((v * 1000.0).round() as u32)
}

fn whole(v: f64, what: &str) -> Result<u64, String> {
    if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 1.8e19 {
        Ok(v as u64)
    } else {
        Err(format!("{v} is not {what}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct T {
        c: MilliCpu,
        m: ByteSize,
        t: Seconds,
    }

    #[test]
    fn credits_parse_as_people_write_them_and_as_they_are_shown() {
        let ok: [(&str, u64); 10] = [
            ("12", 12_000_000),
            ("12.5", 12_500_000),
            ("12.5cr", 12_500_000),
            (" 12.5 cr ", 12_500_000),
            ("0.000001", 1),
            (".5", 500_000),
            ("3.", 3_000_000),
            ("2500000µcr", 2_500_000),
            ("7 ucr", 7),
            ("0", 0),
        ];
        for (s, want) in ok {
            assert_eq!(s.parse::<Credits>(), Ok(Credits(want)), "{s}");
        }
        for bad in [
            "",
            "cr",
            ".",
            "1.0000001",
            "-1",
            "1e6",
            "12 credits",
            "1.5µcr",
            "99999999999999999999",
        ] {
            let e = bad.parse::<Credits>().unwrap_err();
            assert!(e.contains("12.5cr"), "{bad}: {e}");
        }
        for c in [0, 1, 999_999, 1_000_000, 12_345_678, u64::MAX] {
            assert_eq!(Credits(c).to_string().parse::<Credits>(), Ok(Credits(c)));
        }
    }

    #[test]
    fn money_in_json_and_toml_is_micro_credits_or_a_string_with_a_unit() {
        #[derive(Deserialize, Debug)]
        struct M {
            p: Credits,
        }
        let ok: [(&str, u64); 4] = [
            (r#"{"p":2500000}"#, 2_500_000),
            (r#"{"p":"2.5cr"}"#, 2_500_000),
            (r#"{"p":"2500000µcr"}"#, 2_500_000),
            (r#"{"p":"0.5 cr"}"#, 500_000),
        ];
        for (j, want) in ok {
            assert_eq!(
                serde_json::from_str::<M>(j).unwrap().p,
                Credits(want),
                "{j}"
            );
        }
        for (j, says) in [
            (r#"{"p":"2.5"}"#, "no unit"),
            (r#"{"p":2.5}"#, "not whole micro-credits"),
            (r#"{"p":-1}"#, "negative"),
            (r#"{"p":"lots cr"}"#, "not an amount"),
        ] {
            let e = serde_json::from_str::<M>(j).unwrap_err().to_string();
            assert!(e.contains(says), "{j}: {e}");
        }
        let t: M = toml::from_str("p = \"1.25cr\"").unwrap();
        assert_eq!(t.p, Credits(1_250_000));
        // Always written back as the integer.
        assert_eq!(serde_json::to_string(&Credits(7)).unwrap(), "7");
    }

    #[test]
    fn friendly_forms_parse() {
        let t: T = serde_json::from_str(r#"{"c":1.5,"m":"2GiB","t":"10m"}"#).unwrap();
        assert_eq!(
            (t.c, t.m, t.t),
            (MilliCpu(1500), ByteSize(2 << 30), Seconds(600))
        );
        let t: T = serde_json::from_str(r#"{"c":2,"m":1024,"t":30}"#).unwrap();
        assert_eq!(
            (t.c, t.m, t.t),
            (MilliCpu(2000), ByteSize(1024), Seconds(30))
        );
    }

    #[test]
    fn bad_forms_say_why() {
        let e = serde_json::from_str::<T>(r#"{"c":1,"m":"2 parsecs","t":1}"#)
            .err()
            .unwrap();
        assert!(e.to_string().contains("unknown size unit"), "{e}");
        let e = serde_json::from_str::<T>(r#"{"c":-1,"m":1,"t":1}"#)
            .err()
            .unwrap();
        assert!(e.to_string().contains("must not be negative"), "{e}");
    }

    #[test]
    fn json_round_trip_is_exact() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct U {
            c: MilliCpu,
            m: ByteSize,
            t: Seconds,
        }
        for c in [1, 500, 1000, 1500, 123_456] {
            let u = U {
                c: MilliCpu(c),
                m: ByteSize(12345),
                t: Seconds(7),
            };
            let back: U = serde_json::from_str(&serde_json::to_string(&u).unwrap()).unwrap();
            assert_eq!(back, u);
        }
    }

    #[test]
    fn credits_display() {
        assert_eq!(Credits(1_500_000).to_string(), "1.500000 cr");
    }
}
