using System.Net;
using System.Text.Json;
using System.Text.Json.Nodes;
using FineTune.Domain.Methods;
using Microsoft.EntityFrameworkCore;

namespace FineTune.Api.Tests;

/// <summary>Submit-time checks of the vblora and xgblora options against the tiny model's shapes
/// (q (64,64), k/v (32,64), o (64,64), gate/up (128,64), down (64,128)).</summary>
public sealed class VbLoraXgbLoraSubmitTests(ApiFactory api) : IClassFixture<ApiFactory>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static string With(string method) => Requests.LoraWith(o => o["method"] = JsonNode.Parse(method));

    public static TheoryData<string, string, int, string, string> BadMethods() => new()
    {
        { "b does not divide a module", """{"type":"vblora","vectorLength":48,"targetModules":["q_proj"]}""", 422, "method.vectorLength", "module q_proj with shape (64, 64)" },
        { "b does not divide down_proj's input", """{"type":"vblora","vectorLength":64,"targetModules":["down_proj","k_proj"]}""", 422, "method.vectorLength", "module k_proj with shape (32, 64)" },
        { "topK above numVectors", """{"type":"vblora","vectorLength":16,"numVectors":4,"topK":5}""", 422, "method.topK", "exceeds numVectors=4" },
        { "logits too large", """{"type":"vblora","vectorLength":16,"numVectors":65536,"r":4096}""", 422, "method.numVectors", "exceeds" },
        { "logits lr zero", """{"type":"vblora","vectorLength":16,"logitsLearningRate":0}""", 422, "method.logitsLearningRate", "must be > 0" },
        { "vblora unknown field", """{"type":"vblora","vectorLength":16,"rank":4}""", 400, "method.rank", "unknown field" },
        { "no layers per round", """{"type":"xgblora","layersPerRound":0}""", 422, "method.layersPerRound", "between 1 and" },
        { "rank above a module", """{"type":"xgblora","rank":40,"targetModules":["v_proj"]}""", 422, "method.rank", "module v_proj with shape (32, 64)" },
        { "shrinkage above 1", """{"type":"xgblora","shrinkage":2}""", 422, "method.shrinkage", "<= 1" },
        { "export rank zero", """{"type":"xgblora","exportRank":0}""", 422, "method.exportRank", "between 1 and 4096" },
    };

    [Theory]
    [MemberData(nameof(BadMethods))]
    public async Task Bad_options_are_refused_with_a_problem_naming_the_field(string why, string method, int status, string field, string message)
    {
        var client = await api.ClientAsync("vbx-bad");
        var response = await client.PostAsync("/v1/fine-tunes", Requests.Body(With(method)), Ct);
        Assert.True(status == (int)response.StatusCode, $"{why}: got {(int)response.StatusCode} {await response.Content.ReadAsStringAsync(Ct)}");
        Assert.Equal("application/problem+json", response.Content.Headers.ContentType?.MediaType);
        var errors = (await response.JsonAsync()).GetProperty("errors");
        Assert.True(errors.TryGetProperty(field, out var list), $"{why}: no error for '{field}' in {errors}");
        Assert.Contains(list.EnumerateArray(), e => e.GetString()!.Contains(message, StringComparison.Ordinal));
        await using var db = api.Db();
        var tenant = await api.TenantIdAsync("vbx-bad");
        Assert.False(await db.Jobs.AnyAsync(j => j.TenantId == tenant, Ct));
    }

    [Fact]
    public async Task Valid_jobs_are_accepted_with_their_defaults_filled_in()
    {
        var client = await api.ClientAsync("vbx-ok");
        var vb = await client.PostAsync("/v1/fine-tunes", Requests.Body(With("""{"type":"vblora","vectorLength":16,"saveOnlyTopkWeights":true}""")), Ct);
        Assert.Equal(HttpStatusCode.Accepted, vb.StatusCode);
        var method = (await vb.JsonAsync()).GetProperty("method");
        Assert.Equal("vblora", method.GetProperty("type").GetString());
        Assert.Equal(256, method.GetProperty("numVectors").GetInt32());
        Assert.Equal(0.01, method.GetProperty("logitsLearningRate").GetDouble());
        Assert.Equal(0.001, method.GetProperty("vectorBankLearningRate").GetDouble());

        var xgb = await client.PostAsync("/v1/fine-tunes", Requests.Body(With("""{"type":"xgblora","layersPerRound":1,"stepsPerRound":5,"exportRank":2}""")), Ct);
        Assert.Equal(HttpStatusCode.Accepted, xgb.StatusCode);
        var id = (await xgb.JsonAsync()).GetProperty("id").GetGuid();
        await using var db = api.Db();
        var row = await db.Jobs.SingleAsync(j => j.Id == id, Ct);
        var x = Assert.IsType<XgbLoraMethod>(row.Method);
        Assert.Equal((1, 1, 5, 2), (x.Rank, x.LayersPerRound, x.StepsPerRound, x.ExportRank));
    }

    [Fact]
    public async Task Swagger_has_examples_for_both_methods()
    {
        var response = await api.CreateClient().GetAsync("/swagger/v1/swagger.json", Ct);
        using var doc = JsonDocument.Parse(await response.Content.ReadAsStringAsync(Ct));
        var examples = doc.RootElement.GetProperty("paths").GetProperty("/v1/fine-tunes").GetProperty("post")
            .GetProperty("requestBody").GetProperty("content").GetProperty("application/json").GetProperty("examples");
        Assert.Equal(2, examples.GetProperty("vblora").GetProperty("value").GetProperty("method").GetProperty("topK").GetInt32());
        Assert.Equal(1, examples.GetProperty("xgblora").GetProperty("value").GetProperty("method").GetProperty("rank").GetInt32());
    }
}
