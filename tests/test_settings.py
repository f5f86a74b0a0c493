import base64
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bot.settings import MAKE_WEBHOOK_SECRET, SettingsError, load_settings


def test_defaults_run_locally_with_an_empty_environment() -> None:
    settings = load_settings({}, dotenv=None)
    assert settings.port == 5052
    assert settings.realtime_model == "gpt-realtime"
    assert settings.realtime_connect_url == "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    assert settings.cors_origins == ()
    assert not settings.openai_enabled


def test_the_seeds_openai_variable_is_an_alias_for_the_api_key() -> None:
    assert load_settings({"OPENAI": "sk-seed"}, dotenv=None).openai_api_key == "sk-seed"
    both = load_settings({"OPENAI": "sk-seed", "OPENAI_API_KEY": "sk-new"}, dotenv=None)
    assert both.openai_api_key == "sk-new"


def test_each_bad_value_is_reported_on_its_own_line_naming_the_variable() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(
            {"PORT": "eighty", "AUDIO_FORMAT": "wav", "CORS_ORIGINS": "*", "STORE_PHONE_NUMBER": "555"},
            dotenv=None,
        )
    lines = str(info.value).splitlines()[1:]
    assert sorted(line.split(":")[0].strip() for line in lines) == [
        "AUDIO_FORMAT", "CORS_ORIGINS", "PORT", "STORE_PHONE_NUMBER",
    ]


def test_values_of_secret_like_variables_are_never_echoed_in_errors() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"TRANSFER_DTMF_KEY": "sk-secret-ish"}, dotenv=None)
    assert "TRANSFER_DTMF_KEY" in str(info.value)
    assert "sk-secret-ish" not in str(info.value)


def test_a_short_console_password_stops_start_up_without_being_echoed() -> None:
    with pytest.raises(SettingsError, match="CONSOLE_PASSWORD") as info:
        load_settings({"CONSOLE_PASSWORD": "hunter2"}, dotenv=None)
    assert "hunter2" not in str(info.value)


def test_a_price_must_be_a_finite_number_of_dollars_not_below_zero() -> None:
    for bad in ("-1", "inf", "nan", "free"):
        with pytest.raises(SettingsError, match="PRICE_AUDIO_OUTPUT_USD_PER_1M"):
            load_settings({"PRICE_AUDIO_OUTPUT_USD_PER_1M": bad}, dotenv=None)


def test_the_realtime_url_must_not_carry_a_query_string() -> None:
    with pytest.raises(SettingsError, match="OPENAI_REALTIME_URL"):
        load_settings({"OPENAI_REALTIME_URL": "wss://x/v1/realtime?model=a"}, dotenv=None)


def test_a_dotenv_file_fills_in_what_the_environment_lacks(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text('# comment\nexport PORT=6000\nREALTIME_VOICE="cedar"\n')
    settings = load_settings({"PORT": "7000"}, dotenv=env_file)
    assert settings.port == 7000
    assert settings.realtime_voice == "cedar"


def test_missing_secrets_disable_only_their_features() -> None:
    settings = load_settings({"OPENAI_API_KEY": "sk-x"}, dotenv=None)
    disabled = settings.disabled_features()
    assert "realtime" not in disabled
    assert {"sms", "webhook", "transfer"} <= set(disabled)


STOCK_SECRET = "whsec_" + base64.b64encode(b"a key of thirty-two bytes, random").decode()


@pytest.mark.parametrize(
    "secret",
    ["mysecret123", "whsec_mysecret123", "whsec_" + base64.b64encode(b"too short").decode()],
)
def test_a_webhook_secret_standard_webhooks_verifiers_would_misread_stops_start_up(secret: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"WEBHOOK_SECRET": secret}, dotenv=None)
    [line] = str(info.value).splitlines()
    assert line.startswith("invalid configuration: WEBHOOK_SECRET: not a Standard Webhooks secret")
    assert "whsec_" in line and "secrets.token_bytes(32)" in line
    assert secret.removeprefix("whsec_") not in line


def test_a_whsec_secret_is_kept_as_given() -> None:
    assert load_settings({"WEBHOOK_SECRET": STOCK_SECRET}, dotenv=None).webhook_secret == STOCK_SECRET


def test_a_plain_base64_secret_is_read_as_stock_verifiers_read_it() -> None:
    plain = STOCK_SECRET.removeprefix("whsec_").rstrip("=")
    settings = load_settings({"WEBHOOK_SECRET": plain}, dotenv=None)
    assert settings.webhook_secret == "whsec_" + plain


def test_the_advice_to_make_a_webhook_secret_makes_one_that_is_accepted() -> None:
    made = subprocess.run(
        shlex.split(MAKE_WEBHOOK_SECRET.replace("python3", sys.executable, 1)),
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert load_settings({"WEBHOOK_SECRET": made}, dotenv=None).webhook_secret == made


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({}, "WEBHOOK_URL and WEBHOOK_SECRET are not set"),
        ({"WEBHOOK_SECRET": STOCK_SECRET}, "WEBHOOK_URL is not set"),
        ({"WEBHOOK_URL": "https://cc.example.com/hooks"}, "WEBHOOK_SECRET is not set"),
    ],
)
def test_the_webhook_warning_names_the_setting_that_is_missing(env: dict[str, str], reason: str) -> None:
    disabled = load_settings(env, dotenv=None).disabled_features()
    assert disabled["webhook"].startswith(reason + ":")


def test_the_sms_warning_names_only_what_is_missing() -> None:
    env = {"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": "token"}
    disabled = load_settings(env, dotenv=None).disabled_features()
    assert disabled["sms"].startswith("TWILIO_FROM_NUMBER is not set:")
    assert "twilio_signature_check" not in disabled
def test_requiring_signed_upgrades_without_the_auth_token_to_check_them_stops_start_up() -> None:
    with pytest.raises(SettingsError, match="REQUIRE_UPGRADE_SIGNATURE needs TWILIO_AUTH_TOKEN"):
        load_settings({"REQUIRE_UPGRADE_SIGNATURE": "true"}, dotenv=None)
    assert load_settings({}, dotenv=None).require_upgrade_signature is False
