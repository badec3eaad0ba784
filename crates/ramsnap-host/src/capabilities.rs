//! Whether this host can take a saved guest (issue 13, item 3): what the
//! domain XML in a memory dump's libvirt header asks of the hypervisor
//! (virtualization type, architecture, machine type, emulator, CPU model),
//! against libvirt's domain capabilities of this host for that emulator and
//! machine. A restore is refused before anything starts when they differ,
//! naming what differs.
use crate::xml::XmlError;
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// What a saved guest needs of the host that restores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNeeds {
    /// `<domain type=...>`: qemu, kvm.
    pub virt_type: String,
    pub arch: String,
    /// The machine type as saved (libvirt saves the expanded name, e.g.
    /// `pc-i440fx-7.2` for `pc`).
    pub machine: String,
    pub emulator: Option<String>,
    /// The CPU model of a `custom` CPU; None for host-model, host-passthrough
    /// or no `<cpu>`.
    pub cpu_model: Option<String>,
}

fn attr(e: &BytesStart<'_>, name: &[u8]) -> Result<Option<String>, XmlError> {
    for a in e.attributes() {
        let a = a?;
        if a.key.as_ref() == name {
            return Ok(Some(a.unescape_value()?.into_owned()));
        }
    }
    Ok(None)
}

/// Walks `xml`, calling `on` with the element path, the element (None for
/// text) and the text (for text events).
fn walk(
    xml: &str,
    mut on: impl FnMut(&[Vec<u8>], Option<&BytesStart<'_>>, Option<&str>) -> Result<(), XmlError>,
) -> Result<(), XmlError> {
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<Vec<u8>> = Vec::new();
    loop {
        match reader.read_event()? {
            Event::Start(e) => {
                path.push(e.name().as_ref().to_vec());
                on(&path, Some(&e), None)?;
            }
            Event::Empty(e) => {
                path.push(e.name().as_ref().to_vec());
                on(&path, Some(&e), None)?;
                path.pop();
            }
            Event::End(_) => {
                path.pop();
            }
            Event::Text(t) => {
                let text = t.unescape()?;
                on(&path, None, Some(text.trim()))?;
            }
            Event::Eof => return Ok(()),
            _ => {}
        }
    }
}

fn at(path: &[Vec<u8>], want: &[&str]) -> bool {
    path.len() == want.len() && path.iter().zip(want).all(|(p, w)| p.as_slice() == w.as_bytes())
}

/// What the domain XML of a saved guest needs.
pub fn guest_needs(domain_xml: &str) -> Result<GuestNeeds, XmlError> {
    let (mut virt_type, mut arch, mut machine) = (None, None, None);
    let (mut emulator, mut cpu_mode, mut cpu_model) = (None, None, None);
    walk(domain_xml, |path, e, text| {
        match (e, text) {
            (Some(e), _) if at(path, &["domain"]) => virt_type = attr(e, b"type")?,
            (Some(e), _) if at(path, &["domain", "os", "type"]) => {
                arch = attr(e, b"arch")?;
                machine = attr(e, b"machine")?;
            }
            (Some(e), _) if at(path, &["domain", "cpu"]) => cpu_mode = attr(e, b"mode")?,
            (None, Some(t)) if at(path, &["domain", "devices", "emulator"]) && !t.is_empty() => {
                emulator = Some(t.to_string())
            }
            (None, Some(t)) if at(path, &["domain", "cpu", "model"]) && !t.is_empty() => {
                cpu_model = Some(t.to_string())
            }
            _ => {}
        }
        Ok(())
    })?;
    let missing = |what: &str| XmlError(format!("the saved domain XML names no {what}"));
    // A <cpu> without a mode is custom (libvirt's default).
    let custom = cpu_mode.as_deref().is_none_or(|m| m == "custom");
    Ok(GuestNeeds {
        virt_type: virt_type.ok_or_else(|| missing("<domain type>"))?,
        arch: arch.ok_or_else(|| missing("<os><type arch>"))?,
        machine: machine.ok_or_else(|| missing("<os><type machine>"))?,
        emulator,
        cpu_model: cpu_model.filter(|_| custom),
    })
}

/// What `needs` asks that the domain capabilities `domcaps` (libvirt's for
/// that emulator, architecture, machine and type) do not offer: one line
/// each; empty when the host can take the guest.
pub fn gaps(needs: &GuestNeeds, domcaps: &str) -> Result<Vec<String>, XmlError> {
    let mut machine = None;
    let mut custom_supported = false;
    // CPU models of the custom mode: (name, usable).
    let mut models: Vec<(String, String)> = Vec::new();
    let mut usable = None;
    let mut in_custom = false;
    walk(domcaps, |path, e, text| {
        match (e, text) {
            (None, Some(t)) if at(path, &["domainCapabilities", "machine"]) => machine = Some(t.to_string()),
            (Some(e), _) if at(path, &["domainCapabilities", "cpu", "mode"]) => {
                in_custom = attr(e, b"name")?.as_deref() == Some("custom");
                if in_custom {
                    custom_supported = attr(e, b"supported")?.as_deref() == Some("yes");
                }
            }
            (Some(e), _) if in_custom && at(path, &["domainCapabilities", "cpu", "mode", "model"]) => {
                usable = attr(e, b"usable")?;
            }
            (None, Some(t)) if in_custom && at(path, &["domainCapabilities", "cpu", "mode", "model"]) => {
                models.push((t.to_string(), usable.take().unwrap_or_default()));
            }
            _ => {}
        }
        Ok(())
    })?;
    let mut out = Vec::new();
    match machine {
        Some(m) if m == needs.machine => {}
        Some(m) => out.push(format!(
            "machine type {}: this host's emulator offers {m} instead",
            needs.machine
        )),
        None => out.push(format!(
            "machine type {}: this host's domain capabilities name no machine",
            needs.machine
        )),
    }
    if let Some(model) = &needs.cpu_model {
        match models.iter().find(|(name, _)| name == model) {
            _ if !custom_supported => out.push(format!(
                "CPU model {model}: this host supports no custom CPU models"
            )),
            Some((_, u)) if u == "yes" => {}
            Some(_) => out.push(format!("CPU model {model}: not usable on this host")),
            None => out.push(format!("CPU model {model}: unknown to this host")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "<domain type='qemu'>
  <name>ramsnap-1</name>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><kernel>/k</kernel></os>
  <cpu mode='custom' match='exact' check='full'>
    <model fallback='forbid'>qemu64</model>
    <feature policy='require' name='rdrand'/>
  </cpu>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>";

    /// Trimmed from `virsh domcapabilities --virttype qemu --machine pc` on
    /// these machines (libvirt 9.0, QEMU 7.2).
    const DOMCAPS: &str = "<domainCapabilities>
  <path>/usr/bin/qemu-system-x86_64</path>
  <domain>qemu</domain>
  <machine>pc-i440fx-7.2</machine>
  <arch>x86_64</arch>
  <cpu>
    <mode name='host-passthrough' supported='no'/>
    <mode name='maximum' supported='yes'/>
    <mode name='host-model' supported='yes'><model fallback='forbid'>qemu64</model></mode>
    <mode name='custom' supported='yes'>
      <model usable='yes' vendor='unknown'>qemu64</model>
      <model usable='no' vendor='AMD'>phenom</model>
    </mode>
  </cpu>
</domainCapabilities>";

    #[test]
    fn a_saved_guest_names_what_it_needs() {
        let n = guest_needs(SAVED).unwrap();
        assert_eq!(
            n,
            GuestNeeds {
                virt_type: "qemu".into(),
                arch: "x86_64".into(),
                machine: "pc-i440fx-7.2".into(),
                emulator: Some("/usr/bin/qemu-system-x86_64".into()),
                cpu_model: Some("qemu64".into()),
            }
        );
        let passthrough = SAVED.replace("mode='custom'", "mode='host-passthrough'");
        assert_eq!(guest_needs(&passthrough).unwrap().cpu_model, None);
        assert!(guest_needs("<domain type='qemu'><os><type>hvm</type></os></domain>").is_err());
        assert!(guest_needs("<domain").is_err());
    }

    #[test]
    fn a_host_takes_a_guest_only_when_machine_and_cpu_model_are_offered() {
        let n = guest_needs(SAVED).unwrap();
        assert_eq!(gaps(&n, DOMCAPS).unwrap(), Vec::<String>::new());
        let other_machine = DOMCAPS.replace("pc-i440fx-7.2", "pc-i440fx-8.0");
        let g = gaps(&n, &other_machine).unwrap();
        assert_eq!(g.len(), 1, "{g:?}");
        assert!(
            g[0].contains("machine type pc-i440fx-7.2") && g[0].contains("pc-i440fx-8.0"),
            "{g:?}"
        );
        let phenom = guest_needs(&SAVED.replace(">qemu64<", ">phenom<")).unwrap();
        let g = gaps(&phenom, DOMCAPS).unwrap();
        assert_eq!(g, vec!["CPU model phenom: not usable on this host".to_string()]);
        let unknown = guest_needs(&SAVED.replace(">qemu64<", ">z80<")).unwrap();
        assert_eq!(
            gaps(&unknown, DOMCAPS).unwrap(),
            vec!["CPU model z80: unknown to this host".to_string()]
        );
        let no_custom = DOMCAPS.replace("name='custom' supported='yes'", "name='custom' supported='no'");
        assert_eq!(gaps(&n, &no_custom).unwrap().len(), 1);
        // host-model and host-passthrough guests are not checked by model.
        let passthrough = guest_needs(&SAVED.replace("mode='custom'", "mode='host-passthrough'")).unwrap();
        assert!(
            gaps(&passthrough, &other_machine.replace(">qemu64<", ">x<"))
                .unwrap()
                .len()
                == 1
        );
    }
}
