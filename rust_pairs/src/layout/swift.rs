//! ms-swift's RLHF rows (DPO, ORPO, SimPO, CPO, RM; its standard format): `messages`, the user
//! turn (its `<image>` / `<video>` tags place the media) and the assistant turn, which is the
//! chosen answer; `rejected_response`, the rejected answer, or `rejected_messages` (ms-swift 3.8+:
//! the same conversation ending in the rejected answer). Images in `images`, videos in `videos`
//! (read for every layout, see [`super::video_of`]). A system turn is rejected with the reason, as
//! in every layout (the sample holds one user prompt). `rejected_images` / `rejected_videos` that
//! differ from `images` / `videos` would give the rejected answer other media than the chosen
//! one, which one sample (one prompt) cannot hold: rejected with that reason.

use super::common::*;
use super::{Ctx, Draft, Parsed};
use serde_json::{Map, Value};

fn clean(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The prompt (the single user turn before the last) and the answer (the last turn, the
/// assistant's) of a conversation in field `field`.
fn prompt_and_answer(v: &Value, field: &str) -> Result<(String, String), FieldErr> {
    let Value::Array(turns) = v else {
        return err(field, format!("expected a list of {{role, content}} messages, got {}", type_name(v)));
    };
    let Some(last) = turns.last() else { return err(field, "no messages") };
    let (role, answer) = turn(last, false).ok_or_else(|| (field.to_string(), "the last message is not a {role, content} message with text".to_string()))?;
    if !is_assistant(role) {
        return err(field, format!("the last message must be the assistant's answer, got a {role:?} turn"));
    }
    let prompt = user_prompt(&Value::Array(turns[..turns.len() - 1].to_vec()), field)?;
    Ok((prompt, answer))
}

pub fn parse(o: &Map<String, Value>, ctx: &Ctx) -> Parsed {
    let res = (|| -> Result<Draft, FieldErr> {
        let messages = o.get("messages").filter(|v| !v.is_null()).ok_or_else(|| ("messages".to_string(), "missing field".to_string()))?;
        let (prompt, chosen) = prompt_and_answer(messages, "messages")?;
        let (rk, rejected) = match (o.get("rejected_response").filter(|v| !v.is_null()), o.get("rejected_messages").filter(|v| !v.is_null())) {
            (Some(r), _) => ("rejected_response", answer(r, "rejected_response")?),
            (None, Some(rm)) => {
                let (rprompt, rejected) = prompt_and_answer(rm, "rejected_messages")?;
                if clean(&rprompt) != clean(&prompt) {
                    return err("rejected_messages", "its user turn differs from the one in messages: the two answers must answer one prompt");
                }
                ("rejected_messages", rejected)
            }
            (None, None) => return err("rejected_response", "missing field (expected rejected_response or rejected_messages)"),
        };
        for (theirs, ours) in [("rejected_images", "images"), ("rejected_videos", "videos")] {
            let differs = o.get(theirs).is_some_and(|r| !crate::video::is_empty_field(r) && o.get(ours) != Some(r));
            if differs {
                return err(theirs, format!(
                    "the rejected answer comes with other media than {ours}: a sample holds one prompt with one set of images and videos"
                ));
            }
        }
        let images = image_of(o, ctx, None)?;
        pair_draft(ctx, ("messages", &prompt), images, ("messages", chosen), (rk, rejected), (None, None), None)
    })();
    finish(ctx, res)
}

#[cfg(test)]
mod tests {
    use crate::config::Format;
    use crate::layout::{detect, parse, Ctx};
    use crate::record::Source;
    use crate::row::ImageSrc;
    use crate::video::VideoSrc;
    use serde_json::json;

    #[test]
    fn ms_swift_rows_with_videos_and_images() {
        let src = Source::line("f", 2);
        let c = Ctx::plain(&src, &[], 1000);
        let v = json!({"messages": [{"role": "user", "content": "<video>Which way does the shape move?"},
                                    {"role": "assistant", "content": "Left."}],
                       "rejected_response": "Right.", "videos": ["clips/a.mp4"]});
        assert_eq!(detect(&v), Some(Format::MsSwift));
        let d = parse(&v, Format::MsSwift, &c).draft.unwrap();
        assert_eq!((d.prompt.as_str(), d.responses[0].text.as_str(), d.responses[1].text.as_str()), ("Which way does the shape move?", "Left.", "Right."));
        assert_eq!((d.videos.clone(), d.video_at.clone(), d.video_fields.clone()), (vec![VideoSrc::Path("clips/a.mp4".into())], vec![0], vec!["videos[0]".to_string()]));
        // An image and a video, each where its tag stands.
        let both = json!({"messages": [{"role": "user", "content": "Does <image> appear in <video>?"}, {"role": "assistant", "content": "Yes."}],
                          "rejected_response": "No.", "images": ["a.jpg"], "videos": ["b.mp4"]});
        let d = parse(&both, Format::MsSwift, &c).draft.unwrap();
        assert_eq!((d.prompt.as_str(), d.image_at.clone(), d.video_at.clone()), ("Does  appear in ?", vec![5], vec![16]));
        assert_eq!(d.images, vec![ImageSrc::Path("a.jpg".into())]);
        // rejected_messages (ms-swift 3.8+): the same user turn, the rejected answer last.
        let rm = json!({"messages": [{"role": "user", "content": "<video>Q?"}, {"role": "assistant", "content": "A."}],
                        "rejected_messages": [{"role": "user", "content": "<video>Q?"}, {"role": "assistant", "content": "B."}],
                        "videos": ["v.mp4"], "rejected_videos": ["v.mp4"]});
        assert_eq!(detect(&rm), Some(Format::MsSwift));
        assert_eq!(parse(&rm, Format::MsSwift, &c).draft.unwrap().responses[1].text, "B.");
    }

    #[test]
    fn what_one_sample_cannot_hold_is_rejected_with_the_reason() {
        let src = Source::line("f", 5);
        let c = Ctx::plain(&src, &[], 1000);
        let reject = |v: serde_json::Value| {
            let r = parse(&v, Format::MsSwift, &c).draft.unwrap_err();
            (r.field, r.reason)
        };
        let (f, why) = reject(json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<video>Q?"},
            {"role": "assistant", "content": "A."}], "rejected_response": "B.", "videos": ["v.mp4"]}));
        assert!(f == "messages" && why.contains("system"), "{why}");
        let (f, why) = reject(json!({"messages": [{"role": "user", "content": "<video>Q?"}, {"role": "assistant", "content": "A."}],
            "rejected_response": "B.", "videos": ["v.mp4"], "rejected_videos": ["w.mp4"]}));
        assert!(f == "rejected_videos" && why.contains("other media"), "{why}");
        let (f, why) = reject(json!({"messages": [{"role": "user", "content": "<video><video>Q?"}, {"role": "assistant", "content": "A."}],
            "rejected_response": "B.", "videos": ["v.mp4"]}));
        assert!(f == "messages" && why.contains("2 <video> placeholders in the prompt but 1 video"), "{why}");
        let (f, why) = reject(json!({"messages": [{"role": "user", "content": "Q?"}], "rejected_response": "B."}));
        assert!(f == "messages" && why.contains("assistant"), "{why}");
        let (f, why) = reject(json!({"messages": [{"role": "user", "content": "<video>Q?"}, {"role": "assistant", "content": "A."}],
            "rejected_response": "B."}));
        assert!(f == "messages" && why.contains("but 0 videos"), "a <video> tag without a video: {why}");
    }
}
